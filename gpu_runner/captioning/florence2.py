"""Florence-2 captioners (transformers' own `Florence2ForConditionalGeneration`, as saved by
e.g. florence-community/Florence-2-base) and a tiny one made in code for tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from gpu_runner.byte_symbols import byte_symbols
from gpu_runner.captioning.base import GenerateOptions, tidy
from gpu_runner.devices import DeviceChoice

# Florence-2 is prompted with a task token; "<DETAILED_CAPTION>" and
# "<MORE_DETAILED_CAPTION>" give longer captions.
DEFAULT_TASK = "<CAPTION>"


@dataclass
class Florence2Model:
    model: Any
    processor: Any
    choice: DeviceChoice

    def generate(self, images: list[Image.Image], options: GenerateOptions) -> list[str]:
        task = options.prompt or DEFAULT_TASK
        inputs = self.processor(text=[task] * len(images), images=images, return_tensors="pt")
        inputs = inputs.to(self.choice.torch_device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.choice.dtype)
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs, max_new_tokens=options.max_new_tokens, num_beams=options.num_beams
            )
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [tidy(t, None) for t in texts]


def load(folder: Path, choice: DeviceChoice) -> Florence2Model:
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    processor = Florence2Processor.from_pretrained(folder, local_files_only=True)
    model = Florence2ForConditionalGeneration.from_pretrained(
        folder, local_files_only=True, dtype=choice.dtype
    )
    return Florence2Model(model.to(choice.torch_device).eval(), processor, choice)


def save_tiny(folder: str | Path, seed: int = 0) -> Path:
    """A tiny randomly initialised Florence-2 saved like a real one: a 4-stage DaViT of
    width 8-16 on 64 px images (2x2 patches + 1 pooled = 5 image tokens) and a 1+1 layer
    BART of width 32 with a byte-level vocabulary made with no files."""
    from transformers import (
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + byte_symbols())}
    tokenizer = BartTokenizer(
        vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"}
    )
    image_processor = CLIPImageProcessorPil(
        size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=5
    )
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    config = Florence2Config(
        text_config={
            "model_type": "bart",
            "vocab_size": len(tokenizer),
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id,
            "forced_bos_token_id": None,
        },
        vision_config={
            "depths": [1, 1, 1, 1],
            "embed_dim": [8, 8, 16, 16],
            "num_heads": [1, 1, 2, 2],
            "num_groups": [1, 1, 2, 2],
            "window_size": 2,
            "projection_dim": 32,
            "max_position_embeddings": 8,
            "max_temporal_embeddings": 4,
            "drop_path_rate": 0.0,
        },
        image_token_id=tokenizer.image_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Florence2ForConditionalGeneration(config)
    out = Path(folder)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
