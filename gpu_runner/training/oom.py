"""What a person is told when a training runs out of device memory.

It advises only what `/style train` offers in chat (preset, steps, rank, lr, method,
quantize):
batch size and resolution come from the preset, so naming them would send people looking
for options that do not exist.
"""

from __future__ import annotations

from typing import Any

from storage.families import (
    LORA_PARAMS_PER_RANK,
    PRESET_BATCH_RANK,
    TRAINABLE_BYTES_PER_PARAM,
    Family,
    training_memory_mb,
)

# A lower rank is worth advising only when it frees this much: it does on SDXL (~0.5 GB
# from rank 32 to 8), not on SD1.5 (its whole rank-32 LoRA state is ~0.1 GB).
_RANK_WORTH_MB = 256
_LOW_RANK = 8


def out_of_memory_message(config: Any) -> str:
    """One line: what ran out, and the chat options that need less memory, if any."""
    head = (
        f"out of GPU memory training {config.method} at batch size {config.batch_size} and "
        f"resolution {config.resolution}"
    )
    ask = "ask the runner's operator to free the GPU or to run it on one with more memory"
    tips = " or ".join(f"`{tip}`" for tip in _cheaper_options(config))
    return f"{head}: train again with {tips}, or {ask}" if tips else f"{head}: {ask}"


def _cheaper_options(config: Any) -> list[str]:
    family: Family = config.family
    rank = getattr(config, "rank", None)
    tips: list[str] = []
    if config.method != "lora":
        lora_batch, lora_rank = PRESET_BATCH_RANK[(family, "lora", config.preset)]
        as_lora = _estimate(config, "lora", lora_batch, rank or lora_rank)
        if as_lora < _estimate(config, config.method, config.batch_size, rank):
            tips.append("method=lora")
    if rank is not None and rank > _LOW_RANK:
        fewer = LORA_PARAMS_PER_RANK[family] * (rank - _LOW_RANK)
        if fewer * TRAINABLE_BYTES_PER_PARAM / 2**20 >= _RANK_WORTH_MB:
            tips.append(f"rank={_LOW_RANK}")
    if config.method != "textual_inversion" and getattr(config, "quantize", "none") == "none":
        tips.append("quantize=nf4")
    return tips


def _estimate(config: Any, method: str, batch_size: int, rank: int | None) -> int:
    need = training_memory_mb(
        "",  # not a built-in name: the estimate for a real model of the family
        config.family,
        method=method,
        resolution=config.resolution,
        batch_size=batch_size,
        rank=rank,
        gradient_checkpointing=config.gradient_checkpointing,
        quantize=getattr(config, "quantize", "none"),
    )
    assert need is not None
    return need
