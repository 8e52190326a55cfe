"""Textual inversion: a new token for the trigger whose embedding row(s) alone are trained.

Only the new vectors are parameters (a forward hook writes them into the embedding output),
so the optimizer state and checkpoints stay a few KB instead of the whole vocabulary.
The private text encoders share every weight with the pipeline's except the (resized)
token table, so SDXL's two encoders cost ~0.2 GB more instead of a 1.6 GB second copy.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gpu_runner.families import family_of_pipeline


class TextualInversionError(ValueError):
    """The trigger cannot become a new token; the message is one line for people."""


def token_strings(trigger: str, num_vectors: int) -> list[str]:
    """diffusers' multi-vector naming: "trig", "trig_1", ... The pipelines' own
    `maybe_convert_prompt` expands "trig" in a prompt to all of them."""
    return [trigger] + [f"{trigger}_{i}" for i in range(1, num_vectors)]


@dataclass
class _Slot:
    """One text encoder's new vectors and the hook that injects them."""

    encoder: Any
    token_ids: list[int]
    vectors: torch.nn.Parameter
    handle: Any = None


@dataclass
class TokenEmbedding:
    """The trainable vectors for one trigger across the pipeline's text encoder(s)."""

    trigger: str
    num_vectors: int
    slots: list[_Slot] = field(default_factory=list)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [s.vectors for s in self.slots]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"vectors.{i}": s.vectors.detach() for i, s in enumerate(self.slots)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, s in enumerate(self.slots):
                s.vectors.copy_(state[f"vectors.{i}"])

    def save(self, path: Path, metadata: dict[str, str]) -> Path:
        """A1111/ComfyUI/diffusers-loadable embedding: `emb_params` (SD1.5) or
        `clip_l`/`clip_g` (SDXL), each (num_vectors, dim)."""
        vectors = [s.vectors.detach().float().cpu().contiguous() for s in self.slots]
        tensors = {"emb_params": vectors[0]}
        if len(vectors) == 2:
            tensors = {"clip_l": vectors[0], "clip_g": vectors[1]}
        save_file(tensors, path, metadata=metadata)
        return path

    def remove_hooks(self) -> None:
        for s in self.slots:
            if s.handle is not None:
                s.handle.remove()
                s.handle = None


def _inject_hook(slot: _Slot) -> Any:
    ids = torch.tensor(slot.token_ids)

    def hook(_module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        input_ids = inputs[0]
        out = output
        for j, tid in enumerate(ids.tolist()):
            mask = (input_ids == tid).unsqueeze(-1)
            if mask.any():
                vec = slot.vectors[j].to(out.dtype)
                out = torch.where(mask, vec, out)
        return out

    return slot.encoder.get_input_embeddings().register_forward_hook(hook)


def share_weights_copy(module: torch.nn.Module, private: torch.nn.Module) -> Any:
    """A new module tree that shares every parameter and buffer with `module` except those
    of its submodule `private`, which are copied.

    The weights nobody changes are not duplicated; `private` (the token table) may then be
    changed on the copy, even in place (resize_token_embeddings swaps the weight's data).
    """
    own = {id(t) for t in itertools.chain(private.parameters(), private.buffers())}
    tensors = itertools.chain(module.parameters(), module.buffers())
    return copy.deepcopy(module, {id(t): t for t in tensors if id(t) not in own})


def _dropout_free(encoder: Any) -> bool:
    config = getattr(encoder, "config", None)
    return all(
        float(getattr(config, name, 0.0) or 0.0) == 0.0
        for name in ("dropout", "attention_dropout", "hidden_dropout")
    )


def enable_checkpointing(encoder: Any) -> bool:
    """Gradient checkpointing on a text encoder that supports it (TI back-propagates
    through every layer of it). Returns whether it is on.

    transformers checkpoints only in training mode, so the encoder is put there; that is
    exact only without dropout (CLIP's configs have none), so others are left alone.
    """
    supported = getattr(encoder, "supports_gradient_checkpointing", False)
    if not supported or not _dropout_free(encoder):
        return False
    # Non-reentrant: the frozen layers' inputs need no grad for the gradient to reach ours.
    kwargs = {"use_reentrant": False}
    enable = getattr(encoder, "activation_checkpointing_enable", None)  # transformers 5
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    encoder.train()
    return True


def attach_token(
    pipeline: Any,
    trigger: str,
    initializer_token: str,
    num_vectors: int,
    *,
    gradient_checkpointing: bool | None = None,
) -> tuple[Any, TokenEmbedding]:
    """A shallow copy of `pipeline` whose tokenizer(s)/text encoder(s) are private copies that
    know the trigger token. The caller's (possibly warm, shared) pipeline is left untouched:
    its encoders' weights are shared, read-only, and only the token tables are new.

    `gradient_checkpointing` (None: on CUDA) checkpoints the private encoders' layers.
    """
    tuned = copy.copy(pipeline)
    emb = TokenEmbedding(trigger, num_vectors)
    pairs = family_of_pipeline(pipeline).text_encoder_pairs
    if not pairs:
        raise TextualInversionError(
            f"{family_of_pipeline(pipeline).label} has no token table to train: use lora or dora"
        )
    tokens = token_strings(trigger, num_vectors)
    for tok_name, enc_name in pairs:
        tokenizer = copy.deepcopy(getattr(pipeline, tok_name))
        shared = getattr(pipeline, enc_name)
        encoder = share_weights_copy(shared, shared.get_input_embeddings())
        added = tokenizer.add_tokens(tokens)
        if added != len(tokens):
            raise TextualInversionError(
                f"the trigger {trigger!r} is already a word the tokenizer knows: "
                "pick a made-up word (e.g. 'zxstyle') for textual inversion"
            )
        init_ids = tokenizer.encode(initializer_token, add_special_tokens=False)
        if not init_ids:
            raise TextualInversionError(
                f"init_word {initializer_token!r} has no tokens: use a word"
            )
        encoder.resize_token_embeddings(len(tokenizer))
        table = encoder.get_input_embeddings().weight
        token_ids = tokenizer.convert_tokens_to_ids(tokens)
        # A word the vocabulary splits (small or domain vocabularies) starts from the mean
        # of its pieces, so every preset's initializer works on every base model.
        init = table[init_ids].detach().float().mean(dim=0)
        vectors = torch.nn.Parameter(init.repeat(num_vectors, 1).to(table.device))
        with torch.no_grad():  # the table's rows too, so a hook-less copy still starts sane
            table[token_ids] = init.to(table.dtype)
        encoder.requires_grad_(False)  # shared weights: frozen for the pipeline's use too
        checkpoint = gradient_checkpointing
        if checkpoint is None:
            checkpoint = table.device.type == "cuda"
        if checkpoint:
            enable_checkpointing(encoder)
        slot = _Slot(encoder, token_ids, vectors)
        slot.handle = _inject_hook(slot)
        emb.slots.append(slot)
        setattr(tuned, tok_name, tokenizer)
        setattr(tuned, enc_name, encoder)
    return tuned, emb
