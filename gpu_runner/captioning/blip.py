"""BLIP captioners (`BlipForConditionalGeneration` + `BlipProcessor`) and a tiny one made in
code for tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from gpu_runner.captioning.base import GenerateOptions, tidy
from gpu_runner.devices import DeviceChoice


@dataclass
class BlipModel:
    model: Any
    processor: Any
    choice: DeviceChoice

    def generate(self, images: list[Image.Image], options: GenerateOptions) -> list[str]:
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        # A prompt (e.g. "a picture of") conditions BLIP as the caption's start.
        if options.prompt:
            kwargs["text"] = [options.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.choice.torch_device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.choice.dtype)
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs, max_new_tokens=options.max_new_tokens, num_beams=options.num_beams
            )
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [tidy(t, options.prompt) for t in texts]


def load(folder: Path, choice: DeviceChoice) -> BlipModel:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(
        folder, local_files_only=True, dtype=choice.dtype
    )
    return BlipModel(model.to(choice.torch_device).eval(), processor, choice)


def save_tiny(folder: str | Path, seed: int = 0) -> Path:
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
