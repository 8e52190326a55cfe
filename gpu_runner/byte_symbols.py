"""The byte-level BPE alphabet (GPT-2, CLIP, BART, Qwen): 256 printable characters, one per
byte. Tiny tokenizers made in code start from it so that any text tokenizes."""

from __future__ import annotations


def byte_symbols() -> list[str]:
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    order = sorted(zip(keep, chars, strict=True))
    return [chr(c) for _, c in order]
