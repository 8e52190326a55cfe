"""The runner's one captioner interface: a local model folder of any supported kind in,
one auto caption per image out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from gpu_runner.captioning.base import (
    Caption,
    CaptionError,
    CaptionModel,
    GenerateOptions,
    ImageInput,
    open_rgb,
)
from gpu_runner.captioning.kinds import kind_of
from gpu_runner.devices import DeviceChoice


class Captioner:
    """Captions images with the model saved in `model_dir`; its config.json says which kind
    (BLIP, Florence-2, Qwen-VL) and so which module loads it. The model loads on first use.

    `prompt` is the kind's conditioning: a text prefix for BLIP (removed from the result), a
    task token for Florence-2 (default "<CAPTION>"), an instruction for Qwen-VL.
    """

    def __init__(
        self,
        model_dir: str | Path,
        choice: DeviceChoice,
        *,
        prompt: str | None = None,
        max_new_tokens: int = 40,
        num_beams: int = 3,
        batch_size: int = 8,
    ) -> None:
        self.model_dir = Path(model_dir).expanduser()
        self.choice = choice
        self.options = GenerateOptions(prompt, max_new_tokens, num_beams)
        self.batch_size = batch_size
        self._model: CaptionModel | None = None

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    def load(self) -> CaptionModel:
        if self._model is None:
            import transformers.utils.logging as transformers_logging

            transformers_logging.disable_progress_bar()  # a runner's log is not a terminal
            kind = kind_of(self.model_dir)
            try:
                self._model = kind.load(self.model_dir, self.choice)
            except (OSError, ValueError, KeyError) as exc:
                raise CaptionError(
                    f"the {kind.name} captioning model in '{self.model_dir}' could not be "
                    f"loaded ({exc}); save it with save_pretrained (e.g. {kind.example})"
                ) from exc
        return self._model

    def caption(self, images: Sequence[ImageInput]) -> list[Caption]:
        """One caption per image, in order; unreadable images get a Caption with `error`."""
        model = self.load()
        out: list[Caption | None] = [None] * len(images)
        readable: list[tuple[int, Image.Image]] = []
        for i, item in enumerate(images):
            try:
                readable.append((i, open_rgb(item)))
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                out[i] = Caption(text="", model=self.model_name, error=f"unreadable image: {exc}")
        for start in range(0, len(readable), self.batch_size):
            chunk = readable[start : start + self.batch_size]
            texts = model.generate([img for _, img in chunk], self.options)
            for (i, _), text in zip(chunk, texts, strict=True):
                out[i] = Caption(text=text, model=self.model_name)
        return [c for c in out if c is not None]
