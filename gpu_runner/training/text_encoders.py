"""Text encoders off the training device while a LoRA trains on cached embeddings: FLUX.1's
T5-XXL (9 GB in bf16), Qwen-Image's Qwen2.5-VL (16 GB) or FLUX.2 klein's Qwen3 (8 GB)
would otherwise sit on the card through every step doing nothing. They come back for what
encodes prompts: the checkpoint samples, a generation lent the pipeline between steps, and
the end of the run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

PARKED = torch.device("cpu")


def text_encoders(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's text encoders (`text_encoder`, `text_encoder_2`, ...)."""
    return [
        module
        for name, module in pipe.components.items()
        if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
    ]


class TextEncoderParking:
    """Owns where the borrowed pipeline's text encoders are during a run: on `device` (as
    it came) or parked in CPU memory. Parking on the CPU itself changes nothing."""

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe = pipe
        self.device = device
        self.parked = False

    @property
    def saves_memory(self) -> bool:
        return self.device.type != PARKED.type

    def park(self) -> None:
        if self.saves_memory and not self.parked:
            for module in text_encoders(self.pipe):
                module.to(PARKED)
            self.parked = True

    def restore(self) -> None:
        if self.parked:
            for module in text_encoders(self.pipe):
                module.to(self.device)
            self.parked = False

    @contextmanager
    def on_device(self) -> Iterator[None]:
        """The text encoders where the pipeline encodes prompts, then parked again."""
        was_parked = self.parked
        self.restore()
        try:
            yield
        finally:
            if was_parked:
                self.park()
