"""Auto-captions for reference images with a local image-to-text model (BLIP) through
transformers. Captions come back with source="auto"; storage decides never to overwrite
a caption a person wrote.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, UnidentifiedImageError

from gpu_runner.devices import DeviceChoice

ImageInput = Image.Image | bytes | str | Path


class CaptionError(ValueError):
    """The captioning model cannot be used; str() says what to fix."""


@dataclass(frozen=True)
class Caption:
    text: str  # empty when `error` is set
    source: Literal["auto"] = "auto"
    model: str = ""
    error: str | None = None  # why this one image got no caption (e.g. a corrupt file)


def _open(item: ImageInput) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    data = item if isinstance(item, bytes) else Path(item).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


class Captioner:
    """BLIP captioning from a local folder (`BlipForConditionalGeneration` + `BlipProcessor`).

    The model loads on first use. `prompt` (e.g. "a picture of") conditions BLIP and is
    removed from the returned text.
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
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.batch_size = batch_size
        self._model: Any = None
        self._processor: Any = None

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    def load(self) -> None:
        if self._model is not None:
            return
        import transformers.utils.logging as transformers_logging
        from transformers import BlipForConditionalGeneration, BlipProcessor

        transformers_logging.disable_progress_bar()  # a runner's log is not a terminal
        if not (self.model_dir / "config.json").is_file():
            raise CaptionError(
                f"no captioning model in '{self.model_dir}'; set the captioner's folder to a "
                "local BLIP model (e.g. a saved Salesforce/blip-image-captioning-base)"
            )
        try:
            self._processor = BlipProcessor.from_pretrained(self.model_dir, local_files_only=True)
            model = BlipForConditionalGeneration.from_pretrained(
                self.model_dir, local_files_only=True, dtype=self.choice.dtype
            )
        except (OSError, ValueError) as exc:
            raise CaptionError(
                f"the captioning model in '{self.model_dir}' could not be loaded ({exc}); it must "
                "be a BLIP captioning model saved with save_pretrained"
            ) from exc
        self._model = model.to(self.choice.torch_device).eval()

    def caption(self, images: Sequence[ImageInput]) -> list[Caption]:
        """One caption per image, in order; unreadable images get a Caption with `error`."""
        self.load()
        out: list[Caption | None] = [None] * len(images)
        readable: list[tuple[int, Image.Image]] = []
        for i, item in enumerate(images):
            try:
                readable.append((i, _open(item)))
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                out[i] = Caption(text="", model=self.model_name, error=f"unreadable image: {exc}")
        for start in range(0, len(readable), self.batch_size):
            chunk = readable[start : start + self.batch_size]
            for (i, _), text in zip(chunk, self._generate([img for _, img in chunk]), strict=True):
                out[i] = Caption(text=text, model=self.model_name)
        return [c for c in out if c is not None]

    def _generate(self, images: list[Image.Image]) -> list[str]:
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self._processor(**kwargs).to(self.choice.torch_device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.choice.dtype)
        with torch.inference_mode():
            ids = self._model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams
            )
        texts = self._processor.batch_decode(ids, skip_special_tokens=True)
        return [self._tidy(t) for t in texts]

    def _tidy(self, text: str) -> str:
        text = " ".join(text.split())
        if self.prompt and text.lower().startswith(self.prompt.lower()):
            text = text[len(self.prompt) :].strip()
        return text


def save_tiny_blip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny randomly initialised BLIP captioner saved like a real one (tests, the demo).

    Its captions are random words; it exists so the real loading and generation code runs
    offline. The tokenizer is made with no files.
    """
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    words = ["a", "an", "the", "photo", "painting", "of", "cat", "dog", "red", "blue", "style"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tokens = specials + words + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    # BLIP starts decoding from [DEC] (its bos) and stops at [SEP].
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
            "bos_token_id": vocab["[DEC]"],
            "pad_token_id": vocab["[PAD]"],
            "sep_token_id": vocab["[SEP]"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    out = Path(folder)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
