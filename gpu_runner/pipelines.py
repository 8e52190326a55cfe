"""Base models: where they come from, how they load offline, and which stay warm.

A base model is named in config by a spec whose source is one of:
- a built-in model (storage.families.BUILTIN_MODELS): `tiny-sd15` / `tiny-sdxl` built in
  code with random weights (fast tests), `toy-sd15` pretrained on the toy world and shipped
  with Atelier (the demo, learning tests),
- a diffusers folder (`model_index.json` inside),
- a single `.safetensors` checkpoint plus a local diffusers config folder (offline),
- a hub id (`org/name`) already in the local Hugging Face cache (never downloaded here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DiffusionPipeline

from gpu_runner.adapter_state import AdapterState
from gpu_runner.devices import (
    DeviceChoice,
    free_memory_bytes,
    memory_budget_bytes,
    release_cached_memory,
)
from gpu_runner.families import (
    FAMILIES,
    ModelFamily,
    builtin_builder,
    family_of_class_name,
    family_of_pipeline,
    get_family,
    runs_labels,
)
from gpu_runner.families.base import BuiltinBuildError
from gpu_runner.lora_import import (
    FAMILY_LABELS,
    LoraImportError,
    file_sha256,
    read_safetensors_header,
)
from storage.families import BUILTIN_MODELS as BUILTIN
from storage.training_bounds import Quantization

log = logging.getLogger(__name__)

SourceKind = Literal["builtin", "folder", "single_file", "hub"]
BUILTIN_MODELS = tuple(BUILTIN)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# diffusers renamed `torch_dtype` to `dtype` (the old name warns); older ones know only it.
try:
    from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

    _DTYPE_KW = "dtype"
except ImportError:
    _DTYPE_KW = "torch_dtype"
# Files from_pretrained loads for a component (no dtype variants such as `.fp16.`).
_WEIGHT_FILE = re.compile(r"^(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.(safetensors|bin)$")


class BaseModelError(ValueError):
    """A base model that cannot be used; str() says what to change."""


class UnknownBaseModelError(BaseModelError):
    pass


class BaseModelLoadError(BaseModelError):
    pass


@dataclass(frozen=True)
class BaseModelSpec:
    """One configured base model. `config` is the diffusers config folder that a single
    checkpoint file needs to load offline; `family` overrides detection."""

    name: str
    source: str
    config: str | None = None
    family: str | None = None  # a FAMILY_LABELS name ("sd2" too)

    @classmethod
    def from_config(cls, name: str, value: str | Mapping[str, Any]) -> BaseModelSpec:
        """`name: source` or `name: {source: ..., config: ..., family: ...}` from config."""
        if isinstance(value, str):
            return cls(name=name, source=value)
        source = value.get("source") or value.get("path")
        if not source:
            raise BaseModelError(
                f"base model '{name}' has no source; give a folder, file or hub id"
            )
        family = value.get("family")
        if family is not None and family not in FAMILY_LABELS:
            raise BaseModelError(
                f"base model '{name}' has family '{family}'; use one of {', '.join(FAMILY_LABELS)}"
            )
        return cls(name=name, source=str(source), config=value.get("config"), family=family)

    @property
    def kind(self) -> SourceKind:
        if self.source in BUILTIN_MODELS:
            return "builtin"
        path = Path(self.source).expanduser()
        if path.is_dir():
            return "folder"
        if path.suffix:
            return "single_file"  # existence and format are checked when it loads
        if _HUB_ID.match(self.source):
            return "hub"
        raise BaseModelError(
            f"base model '{self.name}': '{self.source}' is not a built-in model, an existing "
            "folder, a .safetensors file or a hub id like org/name"
        )


@dataclass
class LoadedPipeline:
    """A warm pipeline plus what is kept on it (loaded adapters die with it)."""

    spec: BaseModelSpec
    pipe: Any  # a pipeline of one of gpu_runner.families
    family: str  # the variant adapter files are checked against ("sd2" too)
    model_hash: str  # sha256 hex of the weights
    nbytes: int
    scheduler_config: dict[str, Any]
    embeddings: dict[str, list[str]] = field(default_factory=dict)  # key -> tokens
    # How the denoiser's weights are stored: "none" as loaded, "nf4" once a training asked
    # for a quantized base (the cache drops such a pipeline when that training ends).
    quantization: Quantization = "none"
    # The one owner of which LoRA adapters are loaded and active on this pipeline.
    adapters: AdapterState = field(init=False)

    def __post_init__(self) -> None:
        self.adapters = AdapterState(self.pipe)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def model_family(self) -> ModelFamily:
        """The family interface this pipeline runs through."""
        return get_family(self.family)

    def quantize_denoiser(self, kind: Quantization) -> None:
        """Store the denoiser's linear layers as `kind` (gpu_runner/training/quantize.py),
        computing in its current dtype. Style adapters come off first: they wrap the layers
        being replaced, and load again from their files when a generation asks."""
        if kind == "none" or kind == self.quantization:
            return
        from gpu_runner.training.quantize import quantize_frozen_linears

        denoiser = self.model_family.denoiser(self.pipe)
        self.adapters.unload_all()
        quantize_frozen_linears(denoiser, next(denoiser.parameters()).dtype)
        self.quantization = kind

    @property
    def short_hash(self) -> str:
        """A1111's "Model hash" (first 10 hex digits; for a single file, the same as A1111's)."""
        return self.model_hash[:10]

    @property
    def tokenizers(self) -> list[Any]:
        return [t for t in (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None)) if t]


def estimate_pipeline_bytes(pipe: DiffusionPipeline) -> int:
    """Parameter and buffer bytes of every torch module in the pipeline."""
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in (*component.parameters(), *component.buffers()):
                total += tensor.numel() * tensor.element_size()
    return total


def _state_hash(pipe: DiffusionPipeline) -> str:
    # Built-in models have no files: hash their weights (fast; they are tiny).
    digest = hashlib.sha256()
    for name, component in sorted(pipe.components.items()):
        if isinstance(component, torch.nn.Module):
            for key, tensor in sorted(component.state_dict().items()):
                digest.update(f"{name}.{key}".encode())
                digest.update(
                    tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
                )
    return digest.hexdigest()


_hash_memo: dict[tuple[str, int, int], str] = {}


def _memo_file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_memo:
        _hash_memo[key] = file_sha256(path)
    return _hash_memo[key]


def folder_hash(folder: Path) -> str:
    """sha256 over the weight files from_pretrained loads (name and content hash of each)."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _WEIGHT_FILE.match(p.name))
    by_dir: dict[Path, list[Path]] = {}
    for p in files:
        by_dir.setdefault(p.parent, []).append(p)
    for parent in sorted(by_dir):
        group = by_dir[parent]
        # from_pretrained prefers safetensors when both exist.
        chosen = [p for p in group if p.suffix == ".safetensors"] or group
        for p in chosen:
            digest.update(str(p.relative_to(folder)).encode())
            digest.update(_memo_file_sha256(p).encode())
    return digest.hexdigest()


def _family_from_index(folder: Path) -> ModelFamily | None:
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    return family_of_class_name(json.loads(index.read_text()).get("_class_name", ""))


def _unsupported(spec: BaseModelSpec, what: str) -> BaseModelLoadError:
    return BaseModelLoadError(
        f"base model '{spec.name}' is {what}; Atelier runs {runs_labels()} text-to-image pipelines"
    )


def _load_folder(spec: BaseModelSpec, folder: Path, dtype: torch.dtype) -> DiffusionPipeline:
    family = _family_from_index(folder)
    if family is None:
        if not (folder / "model_index.json").is_file():
            raise BaseModelLoadError(
                f"base model '{spec.name}': '{folder}' has no model_index.json, so it is not a "
                "diffusers folder; save the model with save_pretrained or name a .safetensors file"
            )
        class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
        raise _unsupported(spec, f"a {class_name or 'pipeline of unknown type'}")
    return family.pipeline_class().from_pretrained(
        str(folder), local_files_only=True, **{_DTYPE_KW: dtype}, **family.load_kwargs()
    )


def _load_single_file(spec: BaseModelSpec, dtype: torch.dtype) -> DiffusionPipeline:
    path = Path(spec.source).expanduser()
    if not path.is_file():
        raise BaseModelLoadError(f"base model '{spec.name}': file '{path}' does not exist")
    try:
        header = read_safetensors_header(path, max_file_bytes=64 * 1024**3)
    except LoraImportError as exc:
        raise BaseModelLoadError(f"base model '{spec.name}': {exc}") from None
    if not spec.config:
        raise BaseModelLoadError(
            f"base model '{spec.name}' is a single file; to load it offline also set `config` to "
            "a local diffusers folder of the same architecture (its model_index.json and "
            "component configs)"
        )
    config = Path(spec.config).expanduser()
    family = get_family(spec.family) if spec.family else _family_from_index(config)
    if family is None:
        family = _family_from_checkpoint_keys(list(header.tensors))
    return family.pipeline_class().from_single_file(
        str(path),
        config=str(config),
        local_files_only=True,
        **{_DTYPE_KW: dtype},
        **family.load_kwargs(),
    )


def _family_from_checkpoint_keys(keys: list[str]) -> ModelFamily:
    """A checkpoint's family from its keys: the first whose marker they carry, else the
    family whose layout has no distinctive key."""
    for family in FAMILIES.values():
        if family.single_file_marker and any(k.startswith(family.single_file_marker) for k in keys):
            return family
    return next(f for f in FAMILIES.values() if f.single_file_fallback)


def _hub_snapshot(spec: BaseModelSpec) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec.source, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise BaseModelLoadError(
            f"base model '{spec.name}' is the hub id '{spec.source}', which is not in this "
            f"machine's Hugging Face cache and Atelier never downloads; fetch it once with "
            f"`hf download {spec.source}` (or copy a cache that has it), or set the source to a "
            "local folder"
        ) from None


def _quiet_progress_bars() -> None:
    # A runner's log is not a terminal: no tqdm bars for loading components.
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _build_builtin(name: str) -> DiffusionPipeline:
    build = builtin_builder(name)
    assert build is not None, f"built-in {name} has no builder"
    try:
        return build(0)
    except BuiltinBuildError as exc:
        raise BaseModelLoadError(str(exc)) from None


def load_pipeline(spec: BaseModelSpec, choice: DeviceChoice) -> LoadedPipeline:
    """Load a base model on the CPU in the device's dtype (the cache moves it to the device)."""
    dtype = choice.dtype
    _quiet_progress_bars()
    try:
        kind = spec.kind
        if kind == "builtin":
            pipe = _build_builtin(spec.source)
            model_hash = _state_hash(pipe)  # of the fp32 weights, whatever the device dtype
            if dtype != torch.float32:
                for component in pipe.components.values():
                    if isinstance(component, torch.nn.Module):
                        torch.nn.Module.to(component, dtype=dtype)
        elif kind == "folder":
            folder = Path(spec.source).expanduser()
            pipe = _load_folder(spec, folder, dtype)
            model_hash = folder_hash(folder)
        elif kind == "single_file":
            pipe = _load_single_file(spec, dtype)
            model_hash = _memo_file_sha256(Path(spec.source).expanduser())
        else:
            folder = _hub_snapshot(spec)
            pipe = _load_folder(spec, folder, dtype)
            model_hash = folder_hash(folder)
    except BaseModelError:
        raise
    except Exception as exc:  # diffusers/transformers raise many types; name the model
        raise BaseModelLoadError(
            f"base model '{spec.name}' ({spec.source}) failed to load: {exc}"
        ) from exc
    if not any(type(pipe) in f.pipeline_classes() for f in FAMILIES.values()):
        raise _unsupported(spec, f"a {type(pipe).__name__}")
    family = family_of_pipeline(pipe).variant_of(pipe)
    if spec.family and spec.family != family:
        raise BaseModelLoadError(
            f"base model '{spec.name}' is configured as {FAMILY_LABELS[spec.family]} but loads "
            f"as {FAMILY_LABELS[family]}; fix `family` in the config"
        )
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(
        spec=spec,
        pipe=pipe,
        family=family,
        model_hash=model_hash,
        nbytes=estimate_pipeline_bytes(pipe),
        scheduler_config=dict(pipe.scheduler.config),
    )


Loader = Callable[[BaseModelSpec, DeviceChoice], LoadedPipeline]


class PipelineCache:
    """Warm pipelines, least recently used evicted first when a new one would not fit in
    `budget_bytes` (estimated from parameter bytes). A model larger than the whole budget
    still loads, alone.

    A pinned model (one being trained) is never evicted: a generation served between
    training steps that needs room takes it from the others, and never makes the cache load
    a second copy of the model the training still holds.
    """

    def __init__(
        self,
        specs: Iterable[BaseModelSpec],
        choice: DeviceChoice,
        budget_bytes: int | None = None,
        loader: Loader = load_pipeline,
    ) -> None:
        self.specs: dict[str, BaseModelSpec] = {s.name: s for s in specs}
        self.choice = choice
        self.budget_bytes = (
            budget_bytes if budget_bytes is not None else memory_budget_bytes(choice)
        )
        self._loader = loader
        self._loaded: OrderedDict[str, LoadedPipeline] = OrderedDict()
        self._pins: Counter[str] = Counter()
        self._lock = threading.RLock()
        # How much the device has free now; None where no limit applies (CPU, MPS).
        self.free_bytes: Callable[[], int | None] = lambda: free_memory_bytes(self.choice)

    def names(self) -> list[str]:
        return list(self.specs)

    def loaded_names(self) -> list[str]:
        """Warm models, least recently used first."""
        return list(self._loaded)

    def pinned_names(self) -> list[str]:
        return [name for name, count in self._pins.items() if count > 0]

    @property
    def used_bytes(self) -> int:
        return sum(p.nbytes for p in self._loaded.values())

    def spec(self, name: str) -> BaseModelSpec:
        try:
            return self.specs[name]
        except KeyError:
            known = ", ".join(self.specs) or "none"
            raise UnknownBaseModelError(
                f"unknown base model '{name}'; the runner is configured with: {known}. "
                "Pick one of those or add it to the runner's config"
            ) from None

    def get(self, name: str) -> LoadedPipeline:
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            spec = self.spec(name)
            loaded = self._loader(spec, self.choice)  # on the CPU: nothing evicted yet
            for victim in self._evictable():
                if self.used_bytes + loaded.nbytes <= self.budget_bytes:
                    break
                self.evict(victim)
            if loaded.nbytes > self.budget_bytes:
                log.warning(
                    "base model %s (%d MiB) is larger than the cache budget (%d MiB)",
                    name, loaded.nbytes >> 20, self.budget_bytes >> 20,
                )  # fmt: skip
            loaded.pipe.to(self.choice.torch_device)
            self._loaded[name] = loaded
            return loaded

    def _evictable(self, keep: str | None = None) -> list[str]:
        """Warm models that may go, least recently used first."""
        return [n for n in self._loaded if n != keep and self._pins[n] <= 0]

    @contextmanager
    def pinned(self, name: str) -> Iterator[LoadedPipeline]:
        """The model, loaded and kept loaded until the block ends (pins nest)."""
        with self._lock:
            loaded = self.get(name)
            self._pins[name] += 1
        try:
            yield loaded
        finally:
            with self._lock:
                self._pins[name] -= 1
                if self._pins[name] <= 0:
                    del self._pins[name]

    def make_room(self, need_bytes: int, *, keep: str) -> list[str]:
        """Evict other unpinned warm models, least recently used first, until the device has
        `need_bytes` free (training needs its activations; idle warm models only wait for a
        generation). Nothing happens where no limit applies. Returns what was evicted."""
        evicted: list[str] = []
        with self._lock:
            for victim in self._evictable(keep):
                free = self.free_bytes()
                if free is None or free >= need_bytes:
                    break
                if self.evict(victim):
                    evicted.append(victim)
            free = self.free_bytes()
            if free is not None and free < need_bytes:
                log.warning(
                    "%d MiB free on %s after releasing warm models; this job expects to need "
                    "%d MiB", free >> 20, self.choice.device, need_bytes >> 20,
                )  # fmt: skip
        return evicted

    def evict(self, name: str) -> bool:
        """Drop a warm model (False if it is not loaded, or pinned by a training)."""
        with self._lock:
            if self._pins[name] > 0:
                return False
            loaded = self._loaded.pop(name, None)
            if loaded is None:
                return False
            log.info("evicting base model %s (%d MiB)", name, loaded.nbytes >> 20)
            del loaded
            release_cached_memory(self.choice)
            return True

    def clear(self) -> None:
        """Drop every warm model that is not pinned."""
        with self._lock:
            for name in list(self._loaded):
                self.evict(name)
