"""Names that only look different: full-width letters, Cyrillic and Greek look-alikes.

`ink` and `іnk` (a Cyrillic і) are two strings but one name to a person reading a prompt,
so a style name or trigger whose skeleton matches an existing one is refused, naming the
one it collides with. The skeleton is NFKC (folds full-width and other compatibility
forms), case-folded, with the common look-alikes of Latin letters mapped to them (after
Unicode's confusables list, TR39, for the letters that occur in names).
"""

from __future__ import annotations

import unicodedata

_LOOKALIKES = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "һ": "h", "і": "i", "ј": "j",
        "к": "k", "ӏ": "l", "м": "m", "н": "h", "о": "o", "р": "p", "ԛ": "q", "г": "r",
        "ѕ": "s", "т": "t", "υ": "u", "ѵ": "v", "ԝ": "w", "х": "x", "у": "y", "ё": "e",
        "ї": "i",
        # Greek
        "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
        "ρ": "p", "τ": "t", "χ": "x", "γ": "y", "ω": "w",
        # Latin look-alikes
        "ı": "i", "ɡ": "g", "ℓ": "l",
    }
)  # fmt: skip


def skeleton(text: str) -> str:
    """What `text` looks like: equal skeletons read as the same word."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    # Drop combining marks that make no visible difference at chat sizes.
    stripped = "".join(
        c for c in unicodedata.normalize("NFD", folded) if unicodedata.category(c) != "Mn"
    )
    return stripped.translate(_LOOKALIKES).replace("_", "-")


def looks_like(a: str, b: str) -> bool:
    return a != b and skeleton(a) == skeleton(b)
