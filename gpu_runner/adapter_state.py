"""The one owner of the LoRA adapters on a warm pipeline.

Which style adapters are loaded, which are active at which weights, and whether a training
adapter is on: every path (generation, the training loop, generations served between
training steps) asks this object for the state it needs instead of calling peft/diffusers
adapter methods itself, so the state cannot drift from what the UNet really does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

Wanted = tuple[tuple[str, float], ...]


class AdapterState:
    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._training: str | None = None
        # Text encoders carrying the training adapter too (a text-encoder LoRA).
        self._training_encoders: tuple[str, ...] = ()
        # What is active now: () none, a tuple of (style adapter, weight), or None when
        # the training adapter is the active one.
        self._active: Wanted | None = ()
        # peft's layers that carry the training adapter (found once: see base_pass).
        self._training_layers: list[Any] = []
        self._adopt_existing()

    @property
    def _denoiser(self) -> Any:
        # The model adapters live on (UNet or transformer): the pipeline family's.
        from gpu_runner.families import family_of_pipeline

        return family_of_pipeline(self._pipe).denoiser(self._pipe)

    def _trained_modules(self) -> list[tuple[str, Any]]:
        """(parameter-name prefix, module) of every model the training adapter is on."""
        return [("", self._denoiser)] + [
            (f"{attr}.", getattr(self._pipe, attr)) for attr in self._training_encoders
        ]

    def _adopt_existing(self) -> None:
        # A pipeline handed over with adapters on it (e.g. by a test): take them over, off.
        names = list(getattr(self._denoiser, "peft_config", {}) or {})
        for name in names:
            self._loaded[name] = None
        if names:
            self._active = None
            self.show(())

    # -- style adapters --------------------------------------------------------------------

    @property
    def loaded(self) -> list[str]:
        """Style adapters on the pipeline, least recently used first."""
        return list(self._loaded)

    @property
    def active(self) -> Wanted:
        """Style adapters active now with their weights (() when none, or while training)."""
        return self._active or ()

    @property
    def training(self) -> bool:
        return self._training is not None and self._active is None

    def ensure(self, name: str, path: Path, keep: int) -> None:
        """Load the style adapter file at `path` under `name` unless it is loaded (least
        recently used ones go first so at most `keep` stay).

        diffusers reads the file itself: a diffusers-format file's alpha lives only in its
        header (`lora_adapter_metadata`), and a state dict handed over in memory loses it, so
        a rank-32/alpha-16 style rendered at twice its trained strength. `use_safetensors`
        also stops diffusers falling back to unpickling a file that is not safetensors."""
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        while len(self._loaded) >= keep:
            oldest, _ = self._loaded.popitem(last=False)
            self._pipe.delete_adapters(oldest)
        self._active = None  # loading changes what diffusers makes active
        self._pipe.load_lora_weights(str(path), adapter_name=name, use_safetensors=True)
        self._loaded[name] = None

    def unload_all(self) -> None:
        """Take every style adapter off, peft's wrapper layers too (before the base's own
        layers are replaced, e.g. quantized); they load again from their files on demand."""
        if self._training is not None:
            raise RuntimeError("a training adapter is on; end the training first")
        if self._loaded:
            self._pipe.unload_lora_weights()
        self._loaded.clear()
        self._active = ()

    def show(self, wanted: Sequence[tuple[str, float]]) -> None:
        """Exactly these style adapters at these weights (none for ()); a training adapter,
        if any, is off."""
        wanted = tuple(wanted)
        if wanted == self._active:
            return
        unknown = [n for n, _ in wanted if n not in self._loaded]
        if unknown:
            raise KeyError(f"adapters not loaded: {unknown}")
        if not wanted:
            if self._loaded or self._training:
                self._pipe.disable_lora()
            self._active = ()
            return
        self._pipe.enable_lora()
        self._pipe.set_adapters([n for n, _ in wanted], adapter_weights=[w for _, w in wanted])
        self._active = wanted

    # -- training --------------------------------------------------------------------------

    def start_training(
        self,
        peft_config: Any,
        name: str,
        seed: int,
        text_config: Any | None = None,
        text_encoders: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Add the training adapter to the denoiser (and with `text_config` to the
        `text_encoders` named), make it the only active one; its parameters (fp32 master
        weights, trainable) are returned by name, a text encoder's prefixed with its
        attribute (`text_encoder.`)."""
        self.show(())
        # peft draws lora_A from the global RNG: seed it so a run is reproducible per seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._denoiser.add_adapter(peft_config, adapter_name=name)
            for attr in text_encoders if text_config is not None else ():
                # peft's own call: transformers' add_adapter wants a newer peft than diffusers
                # and bitsandbytes allow; diffusers handles text encoders at this level too.
                from peft import inject_adapter_in_model

                inject_adapter_in_model(text_config, getattr(self._pipe, attr), adapter_name=name)
        self._training = name
        self._training_encoders = tuple(text_encoders) if text_config is not None else ()
        self._active = ()  # add_adapter leaves the activation to us
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._training_layers = [
            layer
            for _, module in self._trained_modules()
            for layer in module.modules()
            if isinstance(layer, BaseTunerLayer)
        ]
        params = {
            prefix + n: p
            for prefix, module in self._trained_modules()
            for n, p in module.named_parameters()
            if f".{name}." in n
        }
        for p in params.values():
            p.data = p.data.float()
        self.train_on()
        return params

    def train_on(self) -> None:
        """Only the training adapter active, and trainable (peft freezes adapters it turns
        off, so a generation served in between must not leave it frozen)."""
        assert self._training is not None
        from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

        unet = self._denoiser
        unet.enable_adapters()
        unet.set_adapter(self._training)
        for attr in self._training_encoders:
            encoder = getattr(self._pipe, attr)
            set_adapter_layers(encoder, enabled=True)
            set_weights_and_activate_adapters(encoder, [self._training], [1.0])
        for _, module in self._trained_modules():
            for n, p in module.named_parameters():
                if f".{self._training}." in n:
                    p.requires_grad_(True)
        self._active = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Lend the pipeline out mid-training: no adapter active; `show` may set others;
        on exit the training adapter is the only active one again."""
        self.show(())
        try:
            yield
        finally:
            if self._training is not None:
                self.train_on()

    @contextmanager
    def base(self) -> Iterator[None]:
        """The base model alone for a while (e.g. the base side of a training report)."""
        was_training = self.training
        self.show(())
        try:
            yield
        finally:
            if was_training:
                self.train_on()

    @contextmanager
    def base_pass(self) -> Iterator[None]:
        """The base model's prediction in the middle of a training step (output
        preservation): the training adapter's layers off, then on again as they were.

        `base()` goes through diffusers' disable_lora/set_adapter, which walk every submodule
        several times; per step, on toy-sd15, that was a third of the step. Here each of
        peft's layers found at the start of training is switched itself."""
        if not self.training:
            raise RuntimeError("base_pass is for a training step: no training adapter is on")
        for layer in self._training_layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self._training_layers:
                layer.enable_adapters(True)  # peft re-enables the active one: ours

    def end_training(self) -> None:
        """Remove the training adapter (after success, cancel or crash); nothing is active
        afterwards. Safe to call when no training adapter is on."""
        if self._training is None:
            return
        self._denoiser.delete_adapters(self._training)
        from diffusers.utils.peft_utils import delete_adapter_layers

        for attr in self._training_encoders:
            encoder = getattr(self._pipe, attr)
            delete_adapter_layers(encoder, self._training)
            getattr(encoder, "peft_config", {}).pop(self._training, None)
        self._training = None
        self._training_encoders = ()
        self._training_layers = []
        self._active = None  # peft picks some remaining adapter as active: turn all off
        self.show(())
