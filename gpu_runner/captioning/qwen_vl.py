"""Qwen-VL captioners (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: instruction-following vision-language
models, prompted in their chat format) and tiny ones made in code for tests.

Inputs are built from the folder's image processor and tokenizer rather than its
processor class: that class also wants a video processor, which needs torchvision, and a
captioner has no videos. All three generations share the chat and vision tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from gpu_runner.byte_symbols import byte_symbols
from gpu_runner.captioning.base import GenerateOptions, tidy
from gpu_runner.devices import DeviceChoice

DEFAULT_INSTRUCTION = (
    "Describe this image in one sentence for a training caption: the subject, the setting "
    "and the style."
)
IMAGE_PAD = "<|image_pad|>"
_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    IMAGE_PAD,
    "<|video_pad|>",
)

QwenKind = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _chat(image_tokens: int, instruction: str) -> str:
    return (
        f"<|im_start|>user\n<|vision_start|>{IMAGE_PAD * image_tokens}<|vision_end|>"
        f"{instruction}<|im_end|>\n<|im_start|>assistant\n"
    )


@dataclass
class QwenVLModel:
    model: Any
    image_processor: Any
    tokenizer: Any
    choice: DeviceChoice

    def generate(self, images: list[Image.Image], options: GenerateOptions) -> list[str]:
        vision = self.image_processor(images=images, return_tensors="pt")
        # Each image stands for (t*h*w patches / merge^2) pad tokens in the text.
        merge = self.image_processor.merge_size**2
        prompts = [
            _chat(int(grid.prod()) // merge, options.prompt or DEFAULT_INSTRUCTION)
            for grid in vision["image_grid_thw"]
        ]
        text = self.tokenizer(prompts, return_tensors="pt", padding=True)
        inputs = {**text, **vision}
        inputs = {k: v.to(self.choice.torch_device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.choice.dtype)
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs,
                max_new_tokens=options.max_new_tokens,
                num_beams=options.num_beams,
                do_sample=False,
            )
        answers = ids[:, text["input_ids"].shape[1] :]
        return [
            tidy(t, None) for t in self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        ]


def load(folder: Path, choice: DeviceChoice) -> QwenVLModel:
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.padding_side = "left"  # batched generation continues every prompt's end
    image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(
        folder, local_files_only=True, dtype=choice.dtype
    )
    return QwenVLModel(model.to(choice.torch_device).eval(), image_processor, tokenizer, choice)


def save_tiny(folder: str | Path, kind: QwenKind = "qwen2_vl", seed: int = 0) -> Path:
    """A tiny randomly initialised Qwen-VL of `kind` saved like a real one: a one-block
    vision tower of width 32 on images of 2x2 to 4x4 merged patches, a 2-layer text model of
    width 32, and a byte-level tokenizer made with no files."""
    import transformers
    from transformers import AutoModelForImageTextToText, Qwen2Tokenizer, Qwen2VLImageProcessorPil

    vocab = {tok: i for i, tok in enumerate(byte_symbols())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIALS)})
    patch = 16 if kind == "qwen3_vl" else 14
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=(2 * patch) ** 2, max_pixels=(4 * patch) ** 2, patch_size=patch, merge_size=2
    )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    rope["mrope_section"] = [2, 3, 3]
    vision: dict[str, Any] = {
        "depth": 1,
        "num_heads": 2,
        "patch_size": patch,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if kind == "qwen2_vl":
        config_class = transformers.Qwen2VLConfig
        vision |= {"embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2}
    elif kind == "qwen2_5_vl":
        config_class = transformers.Qwen2_5_VLConfig
        vision |= {"hidden_size": 32, "out_hidden_size": 32, "intermediate_size": 64}
        vision |= {"window_size": 2 * patch * 2, "fullatt_block_indexes": [0]}
    else:
        config_class = transformers.Qwen3VLConfig
        vision |= {"hidden_size": 32, "out_hidden_size": 32, "intermediate_size": 64}
        vision |= {"num_position_embeddings": 16, "deepstack_visual_indexes": [0]}
        rope["mrope_interleaved"] = True
    ids = tokenizer.convert_tokens_to_ids
    config = config_class(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 512,
            "rope_parameters": rope,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=vision,
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    out = Path(folder)
    model.save_pretrained(out)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
