"""How a LoRA file made for a family is told from its keys, shapes and header, before
anything loads it: each family declares its signs (`ModelFamily.lora_signs`), and
`gpu_runner.lora_import.detect_family` reads them in `families.DETECTION_ORDER`.

The kinds of sign, strongest first:
- keys only the family's files have (`own_keys`), unless one of `foreign_keys` is there too;
- a naming several families share (`shared_naming`, e.g. Black Forest Labs' kohya names for
  FLUX.1 and FLUX.2): the file is one of them, told by layer widths (`width_ratios`, output
  over input width of a named layer, whatever the model's width), then by depth
  (`deep_blocks`), then by the header;
- the width the cross-attention reads (`context_dims`, per variant: SD1.x 768, SD2.x 1024);
- a layout shared with a variant (`layout_keys`: SD1.x and SD2.x are the same UNet);
- the header (`metadata`: `modelspec.architecture` and `ss_base_model_version`, as kohya,
  musubi-tuner and ai-toolkit write them).
Needs no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol


class Shaped(Protocol):
    shape: tuple[int, ...]


@dataclass(frozen=True)
class HeaderSign:
    """Header values (regexes matched at the start, lowercase) that name one variant."""

    variant: str
    architecture: str = ""  # modelspec.architecture
    base_version: str = ""  # ss_base_model_version

    def matches(self, meta: Mapping[str, str]) -> bool:
        arch = meta.get("modelspec.architecture", "").lower()
        version = meta.get("ss_base_model_version", "").lower()
        return bool(
            (self.architecture and re.match(self.architecture, arch))
            or (self.base_version and re.match(self.base_version, version))
        )


@dataclass(frozen=True)
class LoraSigns:
    own_keys: tuple[str, ...] = ()
    foreign_keys: tuple[str, ...] = ()
    shared_naming: str = ""
    # BFL layer name (`linear1`) -> up rows / down columns of its LoRA in this family.
    width_ratios: Mapping[str, Fraction] = field(default_factory=dict)
    # (regex whose group 1 is a block index, the first index only this family reaches)
    deep_blocks: tuple[str, int] | None = None
    # (regex of a key whose LoRA down weight reads the text width, width -> variant)
    context_key: str = ""
    context_dims: Mapping[int, str] = field(default_factory=dict)
    layout_keys: tuple[str, ...] = ()
    metadata: tuple[HeaderSign, ...] = ()
    # Embedding-file tensor names only this family's textual inversions have.
    embedding_keys: tuple[str, ...] = ()

    def owns_keys(self, keys: list[str]) -> bool:
        return _any(self.own_keys, keys) and not _any(self.foreign_keys, keys)

    def shares_naming(self, keys: list[str]) -> bool:
        return bool(self.shared_naming) and _any((self.shared_naming,), keys)

    def width_matches(self, tensors: Mapping[str, Shaped]) -> bool:
        if not self.width_ratios:
            return False
        layer = re.compile(rf"_({'|'.join(map(re.escape, self.width_ratios))})\.lora_down\.weight$")
        for key, down in tensors.items():
            match = layer.search(key) if re.match(self.shared_naming, key) else None
            up = tensors.get(key.replace(".lora_down.", ".lora_up.")) if match else None
            if match and up and len(down.shape) == len(up.shape) == 2 and down.shape[1]:
                ratio = Fraction(up.shape[0], down.shape[1])
                if ratio == self.width_ratios[match.group(1)]:
                    return True
        return False

    def depth_matches(self, keys: list[str]) -> bool:
        if self.deep_blocks is None:
            return False
        pattern, first = self.deep_blocks
        return any((m := re.match(pattern, k)) and int(m.group(1)) >= first for k in keys)

    def variant_of_context_dim(self, tensors: Mapping[str, Shaped]) -> str | None:
        if not self.context_key:
            return None
        for key, info in tensors.items():
            if re.search(self.context_key, key) and len(info.shape) >= 2:
                return self.context_dims.get(info.shape[1])
        return None

    def has_layout(self, keys: list[str]) -> bool:
        return _any(self.layout_keys, keys)

    def variant_of_header(self, meta: Mapping[str, str]) -> str | None:
        return next((s.variant for s in self.metadata if s.matches(meta)), None)


def _any(patterns: tuple[str, ...], keys: list[str]) -> bool:
    return any(re.search(p, k) for p in patterns for k in keys)
