"""Text-to-image generation on warm pipelines.

Requests that share base model, adapters, size, steps, CFG and sampler run as one batched
pipeline call; each image has its own CPU `torch.Generator`, so a seed gives the same image
on any device and in any batch (batched vs alone differ by at most 1/255, DESIGN.md).
LoRAs load once per pipeline under distinctive adapter names and are switched with
`set_adapters`; the base model is never reloaded for a style change.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoPipelineForImage2Image
from PIL import Image
from safetensors.torch import load_file

from gpu_runner.devices import DeviceError, is_out_of_memory, release_cached_memory
from gpu_runner.lora_import import (
    FAMILY_LABELS,
    LoraImportError,
    file_sha256,
    inspect_adapter_file,
)
from gpu_runner.pipelines import (
    BaseModelError,
    LoadedPipeline,
    PipelineCache,
    estimate_pipeline_bytes,
)
from gpu_runner.png_metadata import (
    A1111Parameters,
    LoraRef,
    describe_comparison,
    encode_png,
    format_parameters,
    side_by_side,
)
from gpu_runner.prompts import (
    DEFAULT_LIMITS,
    MAX_WEIGHT,
    MIN_WEIGHT,
    AdapterInfo,
    AdapterUse,
    InvalidRequestError,
    Limits,
    parse_prompt,
    strip_lora_tags,
    validate_settings,
)
from gpu_runner.samplers import resolve_sampler
from gpu_runner.training.export import a1111_lora_hash, lora_file_stem
from storage.families import defaults_for, trigger_weight

log = logging.getLogger(__name__)


class _NoTextEncoderLoraNotice(logging.Filter):
    """Drop diffusers' warning that a UNet-only LoRA has no text-encoder keys: Atelier's
    LoRAs are UNet-only, so it would fire on every adapter load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


logging.getLogger("diffusers.loaders.lora_base").addFilter(_NoTextEncoderLoraNotice())

RECORD_VERSION = 1
Variant = Literal["style", "base", "compare"]
StepCallback = Callable[[int, int], None]


class GenerationError(Exception):
    """Generation failed in a way the requester should hear about; str() is one line."""


class GenerationOutOfMemoryError(GenerationError):
    pass


# Everything the runner should report to the requester rather than treat as a crash.
USER_ERRORS: tuple[type[BaseException], ...] = (
    GenerationError,
    InvalidRequestError,
    BaseModelError,
    LoraImportError,
    DeviceError,
)


@dataclass(frozen=True)
class GenerationRequest:
    """One /imagine. `prompt` is as typed (tags included; they are stripped before the model
    sees it); `adapters` are already resolved, e.g. by `from_prompt`. Image i uses seed+i."""

    prompt: str
    base_model: str = "tiny-sd15"
    negative_prompt: str = ""
    seed: int | None = None
    # None: the base model's default from storage.families (filled in by the Generator).
    steps: int | None = None
    cfg: float | None = None
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    count: int = 1
    adapters: tuple[AdapterUse, ...] = ()
    compare: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)  # copied into the JSON record
    # Image-to-image: the starting picture (encoded image bytes), resized to width x height
    # (an upscale's x2 resize is the "hires fix" first half), and the share repainted.
    init_image: bytes | None = None
    strength: float | None = None

    @classmethod
    def from_prompt(
        cls, prompt: str, known: Mapping[str, AdapterInfo], **settings: Any
    ) -> GenerationRequest:
        """Adapters from trigger words (`known`: trigger -> adapter) and `<lora:name:w>` tags."""
        base = settings.get("base_model", cls.base_model)
        parsed = parse_prompt(prompt, known, trigger_weight(base))
        return cls(prompt=prompt, adapters=parsed.adapters, **settings)

    @property
    def seeds(self) -> list[int]:
        if self.seed is None:
            raise ValueError("seed is not drawn yet; call with_seed() first")
        return [(self.seed + i) % (DEFAULT_LIMITS.max_seed + 1) for i in range(self.count)]

    def with_seed(self) -> GenerationRequest:
        """This request with a seed: its own, or a fresh random one (always recorded)."""
        if self.seed is not None:
            return self
        return replace(self, seed=secrets.randbelow(DEFAULT_LIMITS.max_seed + 1))

    def with_defaults(self, family: str) -> GenerationRequest:
        """Unset settings from the one table of family defaults."""
        defaults = defaults_for(self.base_model, family)
        unset = {
            k: getattr(defaults, k)
            for k in ("steps", "cfg", "width", "height", "sampler")
            if getattr(self, k) is None
        }
        return replace(self, **unset) if unset else self

    def validate(self, family: str, limits: Limits = DEFAULT_LIMITS) -> None:
        """Refuse settings out of range for the base model's `family` (storage.families)."""
        assert self.steps is not None and self.cfg is not None and self.sampler is not None
        assert self.width is not None and self.height is not None
        validate_settings(
            steps=self.steps,
            cfg=self.cfg,
            width=self.width,
            height=self.height,
            count=self.count,
            seed=self.seed,
            family=family,
            limits=limits,
        )
        resolve_sampler(self.sampler)
        names = [use.adapter.name for use in self.adapters]
        if len(set(names)) != len(names):
            raise InvalidRequestError("the same style is selected twice; name each style once")
        for use in self.adapters:
            if not MIN_WEIGHT <= use.weight <= MAX_WEIGHT:
                raise InvalidRequestError(
                    f"style '{use.adapter.name}' has weight {use.weight}; use {MIN_WEIGHT} to "
                    f"{MAX_WEIGHT}"
                )
        if self.compare and not self.adapters:
            raise InvalidRequestError(
                "compare needs a style: put a style's trigger word or <lora:name:1> in the prompt"
            )
        if self.init_image is not None and not 0.0 < (self.strength or 0.0) <= 1.0:
            raise InvalidRequestError("image-to-image needs a strength above 0 and at most 1")

    @property
    def init_key(self) -> str | None:
        """Identity of the starting picture and strength (None: text-to-image)."""
        if self.init_image is None:
            return None
        return f"{hashlib.sha256(self.init_image).hexdigest()}:{self.strength:g}"


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    seed: int
    variant: Variant
    width: int
    height: int
    infotext: str  # A1111 `parameters` text (also in the PNG)
    record: dict[str, Any]  # Atelier's JSON record (also in the PNG)


@dataclass(frozen=True)
class GenerationResult:
    request: GenerationRequest  # seed filled in
    images: list[GeneratedImage]  # with the request's adapters, one per seed
    base_images: list[GeneratedImage] = field(default_factory=list)  # compare: no adapters
    comparisons: list[GeneratedImage] = field(default_factory=list)  # compare: base | style
    # What the person should know about how the request was served (one line each).
    notices: tuple[str, ...] = ()
    # The base model's family as people read it ("FLUX.2 [klein]"), for the result text.
    family_label: str = ""

    @property
    def seeds(self) -> list[int]:
        return [img.seed for img in self.images]


# --- internals --------------------------------------------------------------------------


def _open_init(data: bytes, width: int, height: int) -> Image.Image:
    """The starting picture at the requested size (Lanczos: the hires-fix resize)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return rgb


@dataclass(frozen=True)
class _FileKey:
    """Content identity of an adapter file, memoized by path, size and mtime."""

    sha256: str
    addnet: str


_file_keys: dict[tuple[str, int, int], _FileKey] = {}


def _file_key(info: AdapterInfo) -> _FileKey:
    path = Path(info.path)
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _file_keys:
        _file_keys[memo] = _FileKey(info.sha256 or file_sha256(path), a1111_lora_hash(path))
    return _file_keys[memo]


@dataclass
class _Render:
    """One variant of one request: what a batch slot needs."""

    index: int  # position in the caller's list
    request: GenerationRequest
    variant: Literal["style", "base"]
    adapters: tuple[AdapterUse, ...]
    text: str
    images: list[Image.Image] = field(default_factory=list)
    loaded: LoadedPipeline | None = None  # the pipeline that rendered it


def _group_key(render: _Render) -> tuple[Any, ...]:
    r = render.request
    adapters = tuple((u.adapter.path, u.adapter.kind, u.weight) for u in render.adapters)
    return (
        r.base_model,
        adapters,
        r.width,
        r.height,
        r.steps,
        r.cfg,
        resolve_sampler(r.sampler).name,
        r.init_key,
    )


# The most images one pipeline call draws, however small (see Generator.images_per_call).
MAX_IMAGES_PER_CALL = 64


class Generator:
    """Generates images for requests on a PipelineCache's warm pipelines."""

    def __init__(
        self,
        cache: PipelineCache,
        *,
        limits: Limits = DEFAULT_LIMITS,
        max_batch: int = 8,
        max_loras_per_pipeline: int = 16,
    ) -> None:
        self.cache = cache
        self.limits = limits
        self.max_batch = max_batch
        self.max_loras = max_loras_per_pipeline

    # -- public --------------------------------------------------------------------------

    def generate(
        self, request: GenerationRequest, on_step: StepCallback | None = None
    ) -> GenerationResult:
        """One request; raises a USER_ERRORS exception with a clear message on failure."""
        (outcome,) = self.generate_many([request], on_step=on_step)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def generate_many(
        self, requests: Sequence[GenerationRequest], on_step: StepCallback | None = None
    ) -> list[GenerationResult | Exception]:
        """Several requests, batched where they share settings. Each slot of the returned
        list is the request's result or the USER_ERRORS exception that ended it (one bad
        request does not fail the others). Anything else (a bug, or a cancel raised from
        `on_step`) propagates for the runner to handle."""
        outcomes: list[Any] = [None] * len(requests)
        renders: list[_Render] = []
        for i, raw in enumerate(requests):
            try:
                loaded = self.cache.get(raw.base_model)
                request = raw.with_seed().with_defaults(loaded.family)
                request.validate(loaded.family, self.limits)
                self._check_adapters(loaded, request.adapters)
                text = strip_lora_tags(request.prompt)
                self._sync_embeddings(loaded, request.adapters, [text])
                family = loaded.model_family
                family.check_prompt_length(loaded.pipe, text, "prompt")
                if family.takes_negative_prompt:
                    family.check_prompt_length(
                        loaded.pipe, request.negative_prompt, "negative prompt"
                    )
            except USER_ERRORS as exc:
                outcomes[i] = exc
                continue
            renders.append(_Render(i, request, "style", request.adapters, text))
            if request.compare:
                renders.append(_Render(i, request, "base", (), text))

        groups: OrderedDict[tuple[Any, ...], list[_Render]] = OrderedDict()
        for render in renders:
            groups.setdefault(_group_key(render), []).append(render)
        failed: dict[int, BaseException] = {}
        for members in groups.values():
            try:
                self._run_group(members, on_step)
            except USER_ERRORS as exc:
                for render in members:
                    failed.setdefault(render.index, exc)

        for render in renders:
            if render.index in failed:
                outcomes[render.index] = failed[render.index]
        by_request: dict[int, list[_Render]] = {}
        for render in renders:
            by_request.setdefault(render.index, []).append(render)
        for index, parts in by_request.items():
            if outcomes[index] is None:
                outcomes[index] = self._result(parts)
        return outcomes

    # -- adapters ------------------------------------------------------------------------

    def _check_adapters(self, loaded: LoadedPipeline, adapters: Sequence[AdapterUse]) -> None:
        loras = sum(1 for use in adapters if use.adapter.kind == "lora")
        if loras > self.max_loras:
            raise InvalidRequestError(
                f"{loras} LoRAs in one prompt is more than this runner combines "
                f"({self.max_loras}); use fewer styles"
            )
        for use in adapters:
            path = Path(use.adapter.path)
            if not path.is_file():
                raise GenerationError(
                    f"style '{use.adapter.name}': its file {path.name} is missing on this runner"
                )
            info = inspect_adapter_file(path, with_hashes=False)  # header only: cheap
            if info.kind != use.adapter.kind:
                raise GenerationError(
                    f"style '{use.adapter.name}' is registered as a {use.adapter.kind} but its "
                    f"file holds a {info.kind}"
                )
            if info.family and info.family != loaded.family:
                raise GenerationError(
                    f"style '{use.adapter.name}' was made for {FAMILY_LABELS[info.family]}; base "
                    f"model '{loaded.name}' is {FAMILY_LABELS[loaded.family]}"
                )

    @staticmethod
    def adapter_name(info: AdapterInfo) -> str:
        # Distinctive: short names that are substrings of module names confuse peft.
        return f"atelier_{_file_key(info).sha256[:16]}"

    def _ensure_lora(self, loaded: LoadedPipeline, info: AdapterInfo) -> str:
        name = self.adapter_name(info)

        try:
            loaded.adapters.ensure(name, Path(info.render_path or info.path), keep=self.max_loras)
        except Exception as exc:  # peft/diffusers raise assorted errors for bad files
            raise GenerationError(
                f"style '{info.name}': its LoRA could not be applied to '{loaded.name}' ({exc})"
            ) from exc
        loaded.nbytes = estimate_pipeline_bytes(loaded.pipe)
        return name

    def _activate_loras(self, loaded: LoadedPipeline, adapters: Sequence[AdapterUse]) -> None:
        loras = [u for u in adapters if u.adapter.kind == "lora"]
        names = [self._ensure_lora(loaded, u.adapter) for u in loras]
        loaded.adapters.show(tuple((n, u.weight) for n, u in zip(names, loras, strict=True)))

    def _embedding_tokens(self, info: AdapterInfo) -> str:
        return info.trigger or info.name

    def _sync_embeddings(
        self, loaded: LoadedPipeline, adapters: Sequence[AdapterUse], texts: Sequence[str]
    ) -> None:
        """Load the requested embeddings; unload others whose token the texts use (so the
        base side of a compare reads the trigger as plain words)."""
        wanted = {
            self.adapter_name(u.adapter): u.adapter
            for u in adapters
            if u.adapter.kind == "embedding"
        }
        for key in list(loaded.embeddings):
            tokens = loaded.embeddings[key]
            used = re.compile(rf"(?<!\w){re.escape(tokens[0])}(?!\w)", re.IGNORECASE)
            if key not in wanted and any(used.search(t) for t in texts):
                self._unload_embedding(loaded, tokens)
                del loaded.embeddings[key]
        for key, info in wanted.items():
            if key not in loaded.embeddings:
                loaded.embeddings[key] = self._load_embedding(loaded, info)

    def _load_embedding(self, loaded: LoadedPipeline, info: AdapterInfo) -> list[str]:
        token = self._embedding_tokens(info)
        pipe = loaded.pipe
        state = load_file(info.path)
        try:
            loaded.model_family.load_embedding(pipe, state, token)
        except (KeyError, ValueError) as exc:
            raise GenerationError(
                f"embedding '{info.name}' could not be loaded into '{loaded.name}' ({exc})"
            ) from exc
        # Multi-vector embeddings add token, token_1, token_2, ...
        vocab = pipe.tokenizer.get_vocab()
        extra = sorted(
            (t for t in vocab if t.startswith(f"{token}_") and t[len(token) + 1 :].isdigit()),
            key=lambda t: int(t[len(token) + 1 :]),
        )
        return [token, *extra]

    def _unload_embedding(self, loaded: LoadedPipeline, tokens: list[str]) -> None:
        loaded.model_family.unload_embedding(loaded.pipe, tokens)

    # -- running -------------------------------------------------------------------------

    def images_per_call(self, width: int, height: int) -> int:
        """`max_batch` images per pipeline call at 512x512 and above; smaller ones share a
        call up to the same pixel count (at most MAX_IMAGES_PER_CALL): a CPU draws 64 px
        images far faster together (measured on toy-sd15: 0.25 s each in eights, 0.1 s in
        a batch of 90)."""
        share = self.max_batch * 512 * 512 // max(1, width * height)
        return max(self.max_batch, min(MAX_IMAGES_PER_CALL, share))

    def _scheduler(self, loaded: LoadedPipeline, sampler: str) -> Any:
        # A fresh scheduler per call: they keep per-run state between steps.
        return loaded.model_family.make_scheduler(loaded.scheduler_config, sampler)

    def _run_group(self, members: list[_Render], on_step: StepCallback | None) -> None:
        first = members[0]
        request = first.request
        loaded = self.cache.get(request.base_model)
        for member in members:
            member.loaded = loaded
        self._activate_loras(loaded, first.adapters)
        self._sync_embeddings(loaded, first.adapters, [m.text for m in members])
        slots: list[tuple[_Render, int]] = [(m, s) for m in members for s in m.request.seeds]
        per_call = self.images_per_call(request.width, request.height)
        for start in range(0, len(slots), per_call):
            chunk = slots[start : start + per_call]
            images = self._call_with_oom_retry(loaded, chunk, on_step)
            for (render, _), image in zip(chunk, images, strict=True):
                render.images.append(image)

    def _call_with_oom_retry(
        self,
        loaded: LoadedPipeline,
        chunk: list[tuple[_Render, int]],
        on_step: StepCallback | None,
    ) -> list[Image.Image]:
        try:
            return self._call(loaded, chunk, on_step)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            release_cached_memory(self.cache.choice)
            request = chunk[0][0].request
            if len(chunk) == 1:
                raise GenerationOutOfMemoryError(
                    f"the GPU ran out of memory at {request.width}x{request.height}; try a smaller "
                    "size, or again when training is not running"
                ) from None
        log.warning("out of memory on a batch of %d; retrying one at a time", len(chunk))
        return [img for slot in chunk for img in self._call_with_oom_retry(loaded, [slot], on_step)]

    def _call(
        self,
        loaded: LoadedPipeline,
        chunk: list[tuple[_Render, int]],
        on_step: StepCallback | None,
    ) -> list[Image.Image]:
        request = chunk[0][0].request
        pipe = loaded.pipe
        kwargs: dict[str, Any] = {
            "width": request.width,
            "height": request.height,
        }
        steps = total = request.steps
        if request.init_image is not None:
            # The same modules (and loaded LoRAs) wired as an image-to-image pipeline.
            pipe = AutoPipelineForImage2Image.from_pipe(loaded.pipe)
            start = _open_init(request.init_image, request.width, request.height)
            strength = request.strength or 1.0
            kwargs = {"image": [start] * len(chunk), "strength": strength}
            # diffusers runs int(steps x strength) steps: at least one, however few asked.
            steps = max(steps, math.ceil(1 / strength))
            total = int(steps * strength)
        pipe.scheduler = self._scheduler(loaded, request.sampler)
        if on_step is not None:

            def _step_end(
                _pipe: Any, step: int, _t: Any, tensors: dict[str, Any]
            ) -> dict[str, Any]:
                on_step(step + 1, total)
                return tensors

            kwargs["callback_on_step_end"] = _step_end
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
        with torch.inference_mode():
            out = pipe(
                prompt=[render.text for render, _ in chunk],
                num_inference_steps=steps,
                generator=generators,
                output_type="pil",
                **loaded.model_family.cfg_kwargs(request.cfg),
                **loaded.model_family.call_kwargs(
                    [render.request.negative_prompt for render, _ in chunk]
                ),
                **kwargs,
            )
        return list(out.images)

    # -- results -------------------------------------------------------------------------

    def _record(
        self, loaded: LoadedPipeline, render: _Render, seed: int, variant: Variant
    ) -> tuple[str, dict[str, Any]]:
        r = render.request
        sampler = resolve_sampler(r.sampler).name
        loras = [u for u in render.adapters if u.adapter.kind == "lora"]
        # A1111 applies LoRAs from prompt tags: write one for each LoRA actually used.
        # One name for the tag, the file and its ss_output_name: what A1111 looks up.
        refs = tuple(
            LoraRef(
                lora_file_stem(u.adapter.trigger or u.adapter.name),
                u.weight,
                _file_key(u.adapter).addnet,
            )
            for u in loras
        )
        # What the model was given: an ignored negative prompt is not part of the recipe.
        negative = r.negative_prompt if loaded.model_family.takes_negative_prompt else ""
        infotext = format_parameters(
            A1111Parameters(
                prompt=render.text,
                negative_prompt=negative,
                steps=r.steps,
                sampler=sampler,
                cfg=r.cfg,
                seed=seed,
                width=r.width,
                height=r.height,
                model=loaded.name,
                model_hash=loaded.short_hash,
                loras=refs,
            )
        )
        record: dict[str, Any] = {
            "atelier_record": RECORD_VERSION,
            "variant": variant,
            "prompt": r.prompt,
            "prompt_sent": render.text,
            "negative_prompt": negative,
            "seed": seed,
            "steps": r.steps,
            "cfg": r.cfg,
            "width": r.width,
            "height": r.height,
            "sampler": sampler,
            "base_model": {
                "name": loaded.name,
                "family": loaded.family,
                "sha256": loaded.model_hash,
            },
            "adapters": [
                {
                    "name": u.adapter.name,
                    "kind": u.adapter.kind,
                    "trigger": u.adapter.trigger,
                    "weight": u.weight,
                    "sha256": _file_key(u.adapter).sha256,
                }
                for u in render.adapters
            ],
            "extra": dict(r.extra),
        }
        notices = self._notices(loaded, r)
        if notices:
            record["notices"] = list(notices)
        if r.init_image is not None:
            record["img2img"] = {
                "strength": r.strength,
                "init_sha256": hashlib.sha256(r.init_image).hexdigest(),
            }
        return infotext, record

    def _encode(
        self,
        loaded: LoadedPipeline,
        render: _Render,
        seed: int,
        image: Image.Image,
        variant: Variant,
    ) -> GeneratedImage:
        infotext, record = self._record(loaded, render, seed, variant)
        return GeneratedImage(
            png=encode_png(image, infotext, record),
            seed=seed,
            variant=variant,
            width=image.width,
            height=image.height,
            infotext=infotext,
            record=record,
        )

    @staticmethod
    def _compare(
        image: Image.Image, base: GeneratedImage, styled: GeneratedImage
    ) -> GeneratedImage:
        """Base | style side by side, with a record of what the composite is."""
        infotext, record = describe_comparison(image, base, styled)
        return GeneratedImage(
            png=encode_png(image, infotext, record),
            seed=styled.seed,
            variant="compare",
            width=image.width,
            height=image.height,
            infotext=infotext,
            record=record,
        )

    @staticmethod
    def _notices(loaded: LoadedPipeline, request: GenerationRequest) -> tuple[str, ...]:
        family = loaded.model_family
        notices: list[str] = []
        if request.negative_prompt and not family.takes_negative_prompt:
            notices.append(
                f"Negative prompt ignored: {family.label} models take none; say what you "
                "want in the prompt instead."
            )
        if loaded.quantization != "none":
            notices.append(
                f"Drawn on the {loaded.quantization.upper()}-quantized base a training is "
                "using; the same request after it ends is drawn at full precision."
            )
        return tuple(notices)

    def _result(self, parts: list[_Render]) -> GenerationResult:
        style = next(p for p in parts if p.variant == "style")
        base = next((p for p in parts if p.variant == "base"), None)
        request = style.request
        loaded = style.loaded
        assert loaded is not None
        seeds = request.seeds
        images = [
            self._encode(loaded, style, s, im, "style")
            for s, im in zip(seeds, style.images, strict=True)
        ]
        notices = self._notices(loaded, request)
        label = loaded.model_family.label
        if base is None:
            return GenerationResult(
                request=request, images=images, notices=notices, family_label=label
            )
        base_images = [
            self._encode(loaded, base, s, im, "base")
            for s, im in zip(seeds, base.images, strict=True)
        ]
        comparisons = [
            self._compare(side_by_side([b, st]), bi, si)
            for b, st, bi, si in zip(base.images, style.images, base_images, images, strict=True)
        ]
        return GenerationResult(request, images, base_images, comparisons, notices, label)
