"""The training loop: LoRA / DoRA on the UNet attention projections, or textual inversion.

`train(...)` is a library call with no database or queue: the runner passes callbacks for
progress and cancellation, and a checkpoint folder that makes a crashed run resume.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpu_runner import failpoints
from gpu_runner.adapter_state import AdapterState
from gpu_runner.families import family_of_pipeline, get_family
from gpu_runner.training import checkpoint as ckpt
from gpu_runner.training.buckets import bucket_counts
from gpu_runner.training.config import AnyTrainConfig, TextualInversionConfig
from gpu_runner.training.dataset import (
    HOLD_OUT_FROM,
    BatchSampler,
    ImageLike,
    PreparedData,
    TextCond,
    TrainItem,
    caption_dropout_mask,
    encode_text,
    insert_trigger,
    prepare_data,
    sample_latents,
)
from gpu_runner.training.dora import comfy_dora_scales
from gpu_runner.training.export import (
    build_metadata,
    export_diffusers,
    export_kohya,
    now_utc,
)
from gpu_runner.training.objective import (
    ValidationBatch,
    make_validation_batch,
    offset_noise,
    validation_generator,
    weighted_mse,
)
from gpu_runner.training.optimizers import make_optimizer
from gpu_runner.training.precision import Precision, choose_precision
from gpu_runner.training.priors import Priors, draw_priors
from gpu_runner.training.report import ReportFiles, write_report
from gpu_runner.training.text_encoders import TextEncoderParking
from gpu_runner.training.textual_inversion import TokenEmbedding, attach_token
from storage.families import defaults_for, size_multiple
from storage.prompt_rules import shuffled_tags, without_trigger

# Distinctive: a name that is a substring of module names ("b" in "blocks") makes peft
# report false missing keys (DESIGN.md).
ADAPTER_NAME = "atelier_train"

ProgressFn = Callable[[int, int, float, dict[str, Any]], None]
StopFn = Callable[[], bool]
PauseFn = Callable[[], AbstractContextManager[None]]
# Called between steps with a way to pause (lend the pipeline to a generation) and whether
# a checkpoint was just written.
BetweenStepsFn = Callable[[PauseFn, bool], None]


class TrainingError(RuntimeError):
    """Training cannot go on; the message is one line for people."""


@dataclass(frozen=True)
class StepVersion:
    """A checkpoint's adapter, exported: a version of the style a lead may pick."""

    step: int
    kohya_path: Path | None
    diffusers_path: Path | None
    embedding_path: Path | None
    val_loss: float | None  # the last validation at or before this step
    sample_images: list[Path]  # the checkpoint's samples (sample_labels order)


@dataclass
class TrainResult:
    method: str
    final_step: int
    total_steps: int
    stopped: bool  # should_stop() ended the run early; a checkpoint holds its state
    resumed_from: int | None  # checkpoint step this call started from (None: from scratch)
    base_val_loss: float
    val_loss: float | None  # last validation loss of the trained weights
    val_history: list[tuple[int, float]]
    loss_history: list[float]
    checkpoint: Path | None  # latest checkpoint folder
    kohya_path: Path | None = None
    diffusers_path: Path | None = None
    embedding_path: Path | None = None
    report: ReportFiles | None = None
    sample_images: list[Path] = field(default_factory=list)
    # Validation on held-out images, or (a small set) on the training images themselves.
    held_out: bool = True
    # How many images trained at each aspect-ratio bucket ("640x384": 3), largest first.
    buckets: dict[str, int] = field(default_factory=dict)
    # The checkpoints before the last, exported as versions a lead may pick instead.
    step_versions: list[StepVersion] = field(default_factory=list)

    @property
    def val_improvement(self) -> float | None:
        """Relative drop of validation loss against the base (0.4 = 40% lower)."""
        if self.val_loss is None or self.base_val_loss <= 0:
            return None
        return 1.0 - self.val_loss / self.base_val_loss


def train(
    config: AnyTrainConfig,
    items: Sequence[TrainItem | tuple[ImageLike, str]],
    pipeline: Any,
    out_dir: Path,
    *,
    checkpoint_dir: Path,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    between_steps: BetweenStepsFn | None = None,
    device: str | torch.device = "cpu",
    adapters: AdapterState | None = None,
) -> TrainResult:
    """Train, or resume from the newest checkpoint in `checkpoint_dir`, then export + report.

    The pipeline is borrowed: `adapters` (the owner of its adapter state; made here when
    the pipeline has none) adds a training adapter and removes it before returning, after
    success, a stop or a crash; textual inversion works on private copies of the tokenizer
    and text encoder. `between_steps` may pause training to lend the pipeline out (e.g. to a
    generation).
    """
    owner = adapters if adapters is not None else AdapterState(pipeline)
    trainer = _Trainer(config, items, pipeline, Path(out_dir), Path(checkpoint_dir), device, owner)
    try:
        return trainer.run(progress, should_stop, between_steps)
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # MPS/CPU say OOM in a RuntimeError
        from gpu_runner.devices import is_out_of_memory
        from gpu_runner.training.oom import out_of_memory_message

        if not is_out_of_memory(exc):
            raise
        # Advises only options `/style train` has (batch size and resolution come from the
        # preset).
        raise TrainingError(out_of_memory_message(config)) from None
    finally:
        trainer.cleanup()


class _Trainer:
    def __init__(
        self,
        config: AnyTrainConfig,
        items: Sequence[TrainItem | tuple[ImageLike, str]],
        pipeline: Any,
        out_dir: Path,
        checkpoint_dir: Path,
        device: str | torch.device,
        adapters: AdapterState,
    ) -> None:
        self.adapters = adapters
        self.config = config
        self.pipeline = pipeline
        self.out_dir = out_dir
        self.checkpoint_dir = checkpoint_dir
        self.device = torch.device(device)
        self.is_ti = isinstance(config, TextualInversionConfig)
        # A text-encoder LoRA trains beside the denoiser's (SD families).
        self.trains_text = bool(getattr(config, "train_text_encoder", False))
        self.family = get_family(config.family)
        if not self.family.owns(pipeline):
            have = family_of_pipeline(pipeline).label
            raise TrainingError(
                f"the settings are for {config.family} but the base model is {have}: "
                f"choose a {have} preset or another base model"
            )
        self.denoiser = self.family.denoiser(pipeline)
        self.precision: Precision = choose_precision(self.device, config.mixed_precision)
        self.objective = self.family.objective(pipeline, config, self.device)
        self.prediction_type = self.objective.prediction_type
        self.vae_cfg = pipeline.vae.config
        self.scale_latents = self.family.latent_scaler(pipeline.vae)
        self.sample_sampler = defaults_for(config.base_model_name, config.family).sampler
        self.train_pipe: Any = pipeline
        self.encoders = TextEncoderParking(pipeline, self.device)
        self.token: TokenEmbedding | None = None
        self.checkpointing_on = False
        self.items = items
        self.data: PreparedData | None = None

    # ----- set-up -------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.config
        self.pipeline.to(self.device)
        self.denoiser.requires_grad_(False)
        self.pipeline.vae.requires_grad_(False)
        self.adapters.show(())  # style adapters a warm pipeline carries stay out of training
        self.data = prepare_data(
            self.items,
            cfg.trigger,
            cfg.resolution,
            cfg.val_fraction,
            cfg.seed,
            grid=size_multiple(cfg.family),
            buckets=cfg.aspect_buckets,
        )
        if self.is_ti:
            assert isinstance(cfg, TextualInversionConfig)
            self.train_pipe, self.token = attach_token(
                self.pipeline,
                cfg.trigger,
                cfg.initializer_token,
                cfg.num_vectors,
                gradient_checkpointing=self.device.type == "cuda" and cfg.gradient_checkpointing,
            )
        if cfg.cache_latents:
            self._encode_vae_all()
            # TI's text, a trained text encoder's and shuffled captions change every step:
            # never cached.
            if not self.is_ti and not cfg.caption_shuffle and not self.trains_text:
                self.data.text = encode_text(self.pipeline, self.data.captions, self.device)
                self.data.empty_text = encode_text(self.pipeline, [""], self.device)
        self.val_batches = self._make_val_batches()
        self.base_val_loss = self.validation_loss()  # before any adapter: the base model
        self.priors: Priors | None = None
        self.plain_text: TextCond | None = None  # captions without the trigger, then ""
        weight = getattr(cfg, "prior_preservation", 0.0)
        if weight:  # drawn by the base model, before the adapter exists
            self.priors = draw_priors(
                self.pipeline,
                [self.data.captions[i] for i in self.data.train_idx],
                cfg.trigger,
                resolution=cfg.resolution,
                seed=cfg.seed,
                steps=cfg.sample_steps,
                sampler=self.sample_sampler,
                cfg=defaults_for(cfg.base_model_name, cfg.family).cfg,
                device=self.device,
            )
        if getattr(cfg, "output_preservation", 0.0):
            self._plain_text()  # the base's reading, before the adapter exists
        if self.data.text is not None:  # cached: no step encodes text after these
            self.encoders.park()  # so the text encoders wait off the device
        self.trainable = self._make_trainable()
        text_params = [p for n, p in self.trainable.items() if n.startswith("text_encoder")]
        self.optimizer = make_optimizer(
            cfg.optimizer,
            [p for n, p in self.trainable.items() if not n.startswith("text_encoder")],
            cfg,
            self.device,
            text_params,
        )
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=cfg.steps,
        )
        self.scaler = self.precision.grad_scaler()
        self.sampler = BatchSampler(self._train_groups(), cfg.batch_size, cfg.seed)
        self.noise_gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.loss_history: list[float] = []
        self.val_history: list[tuple[int, float]] = []
        self.sample_paths: list[Path] = []
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None
        # TI backpropagates through the UNet to the token too: checkpointing saves as much.
        if self.device.type == "cuda" and cfg.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            self.checkpointing_on = True

    def _train_groups(self) -> list[list[int]]:
        """Positions in train_idx, by bucket (what the batch sampler draws from)."""
        data = self.data
        assert data is not None
        where = {i: pos for pos, i in enumerate(data.train_idx)}
        return [[where[i] for i in g] for g in data.by_bucket(data.train_idx)]

    def _encode_vae_all(self) -> None:
        data = self.data
        assert data is not None
        data.latent_mean, data.latent_std = self._encode_every_image(mirrored=False)
        if self.config.flip:  # both orientations cached: a flip costs nothing per step
            data.mirrored_mean, data.mirrored_std = self._encode_every_image(mirrored=True)

    def _encode_every_image(
        self, *, mirrored: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every image's posterior mean and std, in dataset order, one bucket at a time."""
        data = self.data
        assert data is not None
        count = len(data.captions)
        found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for group in data.by_bucket(range(count)):
            flips = torch.ones(len(group), dtype=torch.bool) if mirrored else None
            mean, std = self._encode_pixels(group, flips)
            found.update({i: (mean[row], std[row]) for row, i in enumerate(group)})
        return [found[i][0] for i in range(count)], [found[i][1] for i in range(count)]

    def _encode_pixels(
        self, idx: list[int], flips: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of images that share a bucket, stacked (mirrored where `flips`
        says)."""
        assert self.data is not None
        vae = self.pipeline.vae
        # fp16 VAEs that ask for it (SDXL's) overflow: encode in fp32, then put it back.
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            return self.family.latent_dist(vae, self.data.stack(idx, flips).to(self.device))
        finally:
            if upcast:
                vae.to(torch.float16)

    def _make_val_batches(self) -> list[ValidationBatch]:
        """One fixed batch per bucket of the validation images (an uncached run encodes only
        those, once)."""
        data = self.data
        assert data is not None
        gen = validation_generator(self.config.seed)
        batches = []
        for group in data.by_bucket(data.val_idx):
            cached = data.latent_mean is not None
            mean, std = data.latents(group) if cached else self._encode_pixels(group)
            batches.append(
                make_validation_batch(group, mean, std, self.scale_latents, self.objective, gen)
            )
        return batches

    def _make_trainable(self) -> dict[str, torch.nn.Parameter]:
        cfg = self.config
        if self.token is not None:
            return {f"vectors.{i}": p for i, p in enumerate(self.token.parameters())}
        from peft import LoraConfig as PeftLoraConfig

        peft_config = PeftLoraConfig(
            r=cfg.rank,  # type: ignore[union-attr]
            lora_alpha=cfg.alpha,  # type: ignore[union-attr]
            init_lora_weights="gaussian",  # diffusers' LoRA scripts: A ~ N(0, 1/r), B = 0
            target_modules=list(cfg.target_modules),  # type: ignore[union-attr]
            use_dora=cfg.method == "dora",
        )
        text_config = None
        if self.trains_text:
            text_config = PeftLoraConfig(
                r=cfg.rank,  # type: ignore[union-attr]
                lora_alpha=cfg.alpha,  # type: ignore[union-attr]
                init_lora_weights="gaussian",
                target_modules=list(self.family.text_encoder_lora_targets),
                use_dora=cfg.method == "dora",
            )
        # fp32 master weights even on an fp16 base; only ours is active while training.
        return self.adapters.start_training(
            peft_config, ADAPTER_NAME, cfg.seed, text_config,
            tuple(self.family.text_encoder_lora_prefixes),
        )  # fmt: skip

    # ----- conditioning -------------------------------------------------------------------

    def _text(
        self, idx: list[int], drop: torch.Tensor | None, grad: bool, shuffle: bool = False
    ) -> TextCond:
        """The captions' conditioning (`shuffle`: their tags reordered, a training step's)."""
        data, cfg = self.data, self.config
        assert data is not None
        if data.text is not None and data.empty_text is not None:
            cond = data.text.select(torch.tensor(idx, device=data.text.hidden.device))
            return cond if drop is None else cond.where(drop, data.empty_text)
        captions = [data.captions[i] for i in idx]
        if shuffle and cfg.caption_shuffle:
            captions = [
                shuffled_tags(
                    c, cfg.trigger, cfg.keep_tags,
                    torch.rand(c.count(",") + 1, generator=self.noise_gen).tolist(),
                )
                for c in captions
            ]  # fmt: skip
        if drop is not None:
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        return encode_text(self.train_pipe, captions, self.device, grad=grad)

    def _predict(
        self,
        noisy: torch.Tensor,
        t: torch.Tensor,
        cond: TextCond,
        idx: list[int],
        time_ids: torch.Tensor | None = None,
    ) -> Any:
        assert self.data is not None
        extra = self.data.time_ids[idx] if time_ids is None else time_ids
        return self.family.predict(self.denoiser, noisy, t, cond, extra)

    # ----- steps --------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step over `gradient_accumulation` micro-batches; their mean loss."""
        cfg = self.config
        micro = cfg.gradient_accumulation
        params = list(self.trainable.values())
        total = 0.0
        for _ in range(micro):
            loss = self._micro_batch_loss() / micro
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += float(loss.detach())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _micro_batch_loss(self) -> torch.Tensor:
        cfg, data, gen = self.config, self.data, self.noise_gen
        assert data is not None
        batch = [data.train_idx[i] for i in self.sampler.next_batch()]
        # Fixed draw order on a CPU generator: [flips,] latents, noise, [noise offset,]
        # timesteps, dropout. The same stream whether or not latents are cached, and on any
        # device; the bracketed draws only where their option is on.
        flips = torch.rand(len(batch), generator=gen) < 0.5 if cfg.flip else None
        if data.latent_mean is not None:
            mean, std = data.latents(batch, flips)
        else:
            mean, std = self._encode_pixels(batch, flips)
        latents = sample_latents(mean, std, gen, self.vae_cfg, self.scale_latents)
        noise = torch.randn(latents.shape, generator=gen)
        if cfg.noise_offset:
            noise = offset_noise(noise, cfg.noise_offset, gen)
        noise = noise.to(self.device)
        t = self.objective.sample_timesteps(len(batch), gen).to(self.device)
        drop = caption_dropout_mask(len(batch), cfg.caption_dropout, gen)
        noisy = self.objective.add_noise(latents, noise, t)
        target = self.objective.target(latents, noise, t)
        weights = self.objective.weights(t)
        keep = getattr(cfg, "output_preservation", 0.0)
        with self.precision.autocast():
            cond = self._text(
                batch,
                drop if cfg.caption_dropout > 0 else None,
                grad=self.is_ti or self.trains_text,
                shuffle=True,
            )
        if keep:
            plain, want = self._preservation_target(noisy, t, batch)
            # The adapter's two predictions (captions as trained, and without the trigger)
            # in one pass: on toy-sd15 a batch of 16 costs 0.7 of two batches of 8.
            with self.precision.autocast():
                both = self._predict(
                    torch.cat([noisy, noisy]), torch.cat([t, t]), cond.cat(plain), batch + batch
                )
            pred, kept = both.chunk(2)
            loss = weighted_mse(pred, target, weights) + keep * weighted_mse(kept, want, None)
        else:
            with self.precision.autocast():
                pred = self._predict(noisy, t, cond, batch)
            loss = weighted_mse(pred, target, weights)
        if self.priors is not None:
            loss = loss + self.config.prior_preservation * self._prior_loss(len(batch))  # type: ignore[union-attr]
        return loss

    def _preservation_target(
        self, noisy: torch.Tensor, t: torch.Tensor, batch: list[int]
    ) -> tuple[TextCond, torch.Tensor]:
        """Output preservation's side of a step: the captions without the trigger (half of
        them the empty one CFG's other pass uses) and the base model's prediction for them on
        this step's noisy latents, which the adapter's must match."""
        data = self.data
        assert data is not None
        empty = torch.rand(len(batch), generator=self.noise_gen) < 0.5
        text = self._plain_text()
        cond = text.select(torch.tensor(batch, device=text.hidden.device))
        cond = cond.where(
            empty, text.select(torch.tensor([len(data.captions)], device=text.hidden.device))
        )
        with torch.no_grad(), self.adapters.base_pass(), self.precision.autocast():
            want = self._predict(noisy, t, cond, batch)
        if self.trains_text:  # the adapter's side reads the plain text through its own
            plain = [without_trigger(data.captions[i], self.config.trigger) for i in batch]
            live = ["" if e else c for c, e in zip(plain, empty.tolist(), strict=True)]
            with self.precision.autocast():
                cond = encode_text(self.train_pipe, live, self.device, grad=True)
        return cond, want.detach()

    def _plain_text(self) -> TextCond:
        """The captions without the trigger, then "": the base text encoder's encoding,
        made once before the adapter exists."""
        data = self.data
        assert data is not None
        if self.plain_text is None:
            plain = [without_trigger(c, self.config.trigger) for c in data.captions]
            self.plain_text = encode_text(self.pipeline, [*plain, ""], self.device)
        return self.plain_text

    def _prior_loss(self, count: int) -> torch.Tensor:
        """Denoising loss on `count` base-model images captioned without the trigger."""
        priors, gen = self.priors, self.noise_gen
        assert priors is not None
        pick = torch.randint(0, len(priors), (count,), generator=gen)
        latents = priors.latents[pick.to(priors.latents.device)]
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        t = self.objective.sample_timesteps(count, gen).to(self.device)
        noisy = self.objective.add_noise(latents, noise, t)
        target = self.objective.target(latents, noise, t)
        cond = priors.text.select(pick.to(priors.text.hidden.device))
        with self.precision.autocast():
            if self.trains_text:  # a trained text encoder reads the plain captions anew
                captions = [priors.captions[i] for i in pick.tolist()]
                cond = encode_text(self.train_pipe, captions, self.device, grad=True)
            pred = self._predict(noisy, t, cond, [], time_ids=priors.time_ids[pick])
        return weighted_mse(pred, target, None)

    def validation_loss(self) -> float:
        """Plain MSE against the target on the fixed validation batch (no SNR weighting,
        so numbers compare across settings)."""
        assert self.data is not None
        was_training = self.denoiser.training
        self.denoiser.eval()
        total, count, chunk = 0.0, 0, max(1, self.config.batch_size * 2)
        with torch.no_grad(), self.precision.autocast():
            chunks = [
                (batch, start)
                for batch in self.val_batches
                for start in range(0, len(batch.timesteps), chunk)
            ]
            for vb, start in chunks:
                sl = slice(start, start + chunk)
                idx = vb.image_idx[sl].tolist()
                t = vb.timesteps[sl]
                noisy = self.objective.add_noise(vb.latents[sl], vb.noise[sl], t)
                target = self.objective.target(vb.latents[sl], vb.noise[sl], t)
                pred = self._predict(noisy, t, self._text(idx, None, grad=False), idx)
                total += float(weighted_mse(pred, target, None)) * len(idx)
                count += len(idx)
        self.denoiser.train(was_training)
        return total / count

    # ----- samples ------------------------------------------------------------------------

    def sample_prompts(self) -> list[str]:
        """The sample prompts with the trigger, then each without it: a style that shows in
        the second half has leaked into prompts that do not ask for it."""
        trigger = self.config.trigger
        triggered = [insert_trigger(p, trigger) for p in self.config.sample_prompts]
        return triggered + [without_trigger(p, trigger) for p in triggered]

    def render(self, pipe: Any) -> list[Any]:
        """Fixed prompts x fixed seeds, CPU generators (same images on any device)."""
        cfg = self.config
        prompts = [p for p in self.sample_prompts() for _ in cfg.sample_seeds]
        gens = [
            torch.Generator("cpu").manual_seed(s)
            for _ in self.sample_prompts()
            for s in cfg.sample_seeds
        ]
        was_training = self.denoiser.training
        self.denoiser.eval()
        # One fixed sampler, whatever the last /imagine left on the pipeline, so samples
        # from different checkpoints (and runs) compare.
        previous = pipe.scheduler
        pipe.scheduler = self.family.make_scheduler(
            self.pipeline.scheduler.config, self.sample_sampler
        )
        try:
            with self.encoders.on_device(), self.precision.autocast():
                out = pipe(
                    prompt=prompts,
                    num_inference_steps=cfg.sample_steps,
                    generator=gens,
                    height=cfg.resolution,
                    width=cfg.resolution,
                )
        finally:
            pipe.scheduler = previous
            self.denoiser.train(was_training)
        return list(out.images)

    def save_samples(self, step: int) -> list[Path]:
        folder = self.out_dir / "samples" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        labels = self.sample_labels()
        for image, label in zip(self.render(self.train_pipe), labels, strict=True):
            path = folder / f"{label}.png"
            image.save(path)
            paths.append(path)
        return paths

    def sample_labels(self) -> list[str]:
        cfg = self.config
        count = len(cfg.sample_prompts)
        names = [f"p{i}" for i in range(count)] + [f"p{i}-no-trigger" for i in range(count)]
        return [f"{name}-seed{s}" for name in names for s in cfg.sample_seeds]

    def base_images(self) -> list[Any]:
        if self.token is not None:
            return self.render(self.pipeline)  # original tokenizer: trigger is plain text
        with self.adapters.base():
            return self.render(self.pipeline)

    # ----- checkpoints --------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        failpoints.hit("before_checkpoint")
        state = {
            "fingerprint": self.config.fingerprint(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "noise_generator": self.noise_gen.get_state(),
            "rng": ckpt.capture_rng(),
            "loss_history": list(self.loss_history),
            "val_steps": [s for s, _ in self.val_history],
            "val_losses": [v for _, v in self.val_history],
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
        }
        weights = {k: p.detach() for k, p in self.trainable.items()}
        path = ckpt.save_checkpoint(
            self.checkpoint_dir, self.step, weights, state, self.config.keep_checkpoints
        )
        self.last_checkpoint = path
        failpoints.hit("after_checkpoint")
        return path

    def maybe_resume(self) -> None:
        path = ckpt.latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return
        weights, state = ckpt.load_checkpoint(path)
        if state.get("fingerprint") != self.config.fingerprint():
            raise ckpt.CheckpointError(
                f"the checkpoints in {self.checkpoint_dir} were made with other settings: "
                "resume with the same settings or use a new checkpoint folder"
            )
        if set(weights) != set(self.trainable):
            raise ckpt.CheckpointError(
                f"checkpoint {path.name} does not match this model's trainable weights: "
                "use a new checkpoint folder"
            )
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(weights[name].to(param.device, param.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.noise_gen.set_state(state["noise_generator"])
        ckpt.restore_rng(state["rng"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.loss_history = list(state["loss_history"])
        self.val_history = list(zip(state["val_steps"], state["val_losses"], strict=True))
        self.step = int(state["step"])
        self.resumed_from = self.step
        self.last_checkpoint = path

    # ----- the run ------------------------------------------------------------------------

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The pipeline as a generation expects it: eval mode, the training adapter off.

        Training state (weights, optimizer, RNGs) is untouched; on exit the adapter owner
        makes the training adapter the only active one again, and trainable.
        """
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            with self.adapters.paused(), self.encoders.on_device():
                yield
        finally:
            for param in self.trainable.values():
                param.requires_grad_(True)
            self.denoiser.train(was_training)

    def run(
        self,
        progress: ProgressFn | None,
        should_stop: StopFn | None,
        between_steps: BetweenStepsFn | None = None,
    ) -> TrainResult:
        cfg = self.config
        started = now_utc()
        self._setup()
        self.maybe_resume()
        self.denoiser.train()
        t0, first = time.perf_counter(), self.step
        stopped = False
        while self.step < cfg.steps:
            if should_stop is not None and should_stop():
                stopped = True
                break
            loss = self.train_step()
            self.step += 1
            self.loss_history.append(loss)
            extras: dict[str, Any] = {"lr": self.lr_scheduler.get_last_lr()[0]}
            done = self.step == cfg.steps
            if self.step % cfg.validate_every == 0 or done:
                val = self.validation_loss()
                self.val_history.append((self.step, val))
                extras.update(val_loss=val, base_val_loss=self.base_val_loss)
                extras["held_out"] = self.data.held_out
            if self.step % cfg.checkpoint_every == 0 or done:
                if not done:  # the final images go to the report instead
                    extras["samples"] = self.save_samples(self.step)
                    extras["version"] = self.export_step(started)
                    self.sample_paths += extras["samples"]
                extras["checkpoint"] = self.save_checkpoint()
            elapsed = time.perf_counter() - t0
            extras["steps_per_s"] = (self.step - first) / elapsed if elapsed > 0 else 0.0
            if progress is not None:
                progress(self.step, cfg.steps, loss, extras)
            if between_steps is not None and self.step < cfg.steps:
                between_steps(self.paused, "checkpoint" in extras)
        if stopped:
            if self.step > 0 and (
                self.last_checkpoint is None
                or ckpt.checkpoint_step(self.last_checkpoint) != self.step
            ):
                self.save_checkpoint()
            return self._result(stopped=True)
        return self._finish(started)

    def _result(self, stopped: bool) -> TrainResult:
        return TrainResult(
            method=self.config.method,
            final_step=self.step,
            total_steps=self.config.steps,
            stopped=stopped,
            resumed_from=self.resumed_from,
            base_val_loss=self.base_val_loss,
            val_loss=self.val_history[-1][1] if self.val_history else None,
            val_history=list(self.val_history),
            loss_history=list(self.loss_history),
            checkpoint=self.last_checkpoint,
            held_out=self.data is None or self.data.held_out,
            buckets=bucket_counts(self.data.buckets) if self.data is not None else {},
            sample_images=list(self.sample_paths),
        )

    def _metadata(self, started: Any) -> dict[str, str]:
        data = self.data
        assert data is not None
        return build_metadata(
            self.config,
            num_train_images=len(data.train_idx),
            captions=[data.captions[i] for i in data.train_idx],
            started_at=started,
            finished_at=now_utc(),
            steps_done=self.step,
            prediction_type=self.prediction_type,
        )

    def _export(
        self, directory: Path, metadata: dict[str, str]
    ) -> tuple[Path | None, Path | None, Path | None]:
        """The adapter as it is now: (kohya file, diffusers file, embedding file)."""
        cfg = self.config
        directory.mkdir(parents=True, exist_ok=True)
        if self.token is not None:
            path = self.token.save(directory / f"{cfg.output_name}.safetensors", metadata)
            return None, None, path
        from peft.utils import get_peft_model_state_dict

        def kohya_ready(module: Any, state: dict[str, Any]) -> dict[str, Any]:
            if cfg.method != "dora":
                return state
            # DoRA magnitudes as ComfyUI's rule reads them back.
            return {**state, **comfy_dora_scales(module, ADAPTER_NAME, state)}

        state = get_peft_model_state_dict(self.denoiser, adapter_name=ADAPTER_NAME)
        encoders = {
            attr: getattr(self.pipeline, attr)
            for attr in self.family.text_encoder_lora_prefixes
            if self.trains_text
        }
        texts = {
            attr: get_peft_model_state_dict(enc, adapter_name=ADAPTER_NAME)
            for attr, enc in encoders.items()
        }
        kohya = export_kohya(
            directory / f"{cfg.output_name}.safetensors",
            kohya_ready(self.denoiser, state),
            cfg.alpha,  # type: ignore[union-attr]
            metadata,
            family=cfg.family,
            text_states={a: kohya_ready(encoders[a], st) for a, st in texts.items()},
        )
        diffusers = export_diffusers(
            directory / "diffusers",
            type(self.pipeline),
            state,
            self.denoiser.peft_config[ADAPTER_NAME].to_dict(),
            {a: (st, encoders[a].peft_config[ADAPTER_NAME].to_dict()) for a, st in texts.items()},
        )
        return kohya, diffusers, None

    def export_step(self, started: Any) -> Path:
        """This checkpoint's adapter as files a lead may pick as the team's version; they
        outlive the training checkpoint (which keeps the optimizer too and is pruned)."""
        folder = self.out_dir / "steps" / f"step-{self.step:06d}"
        self._export(folder, self._metadata(started))
        return folder

    def _step_versions(self, val_history: list[tuple[int, float]]) -> list[StepVersion]:
        """Every checkpoint exported so far in this run (a resumed run's earlier ones too)."""
        found = []
        for folder in sorted((self.out_dir / "steps").glob("step-*")):
            step = int(folder.name.removeprefix("step-"))
            if step >= self.step:
                continue
            name = f"{self.config.output_name}.safetensors"
            files = folder / name if (folder / name).exists() else None
            diffusers = next(iter(sorted((folder / "diffusers").glob("*.safetensors"))), None)
            samples = self.out_dir / "samples" / f"step-{step:06d}"
            measured = [v for s, v in val_history if s <= step]
            found.append(
                StepVersion(
                    step=step,
                    kohya_path=None if self.token is not None else files,
                    diffusers_path=diffusers,
                    embedding_path=files if self.token is not None else None,
                    val_loss=measured[-1] if measured else None,
                    sample_images=[samples / f"{label}.png" for label in self.sample_labels()],
                )
            )
        return found

    def _finish(self, started: Any) -> TrainResult:
        cfg, data = self.config, self.data
        assert data is not None
        result = self._result(stopped=False)
        if not result.val_history or result.val_history[-1][0] != self.step:
            # Resumed from the final checkpoint: measure once more for the report.
            result.val_history.append((self.step, self.validation_loss()))
            result.val_loss = result.val_history[-1][1]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metadata = self._metadata(started)
        result.kohya_path, result.diffusers_path, result.embedding_path = self._export(
            self.out_dir, metadata
        )
        result.step_versions = self._step_versions(result.val_history)
        trained = self.render(self.train_pipe)
        base = self.base_images()
        count = len(cfg.sample_prompts)
        labels = [
            f"s{s} {'trigger' if i < count else 'no trig.'}: {p}"
            for i, p in enumerate(self.sample_prompts())
            for s in cfg.sample_seeds
        ]
        payload = {
            "config": cfg.model_dump(mode="json"),
            "method": cfg.method,
            "device": str(self.device),
            "precision": self.precision.label,
            "prediction_type": self.prediction_type,
            "num_images": len(data.captions),
            "train_images": len(data.train_idx),
            "val_images": len(data.val_idx),
            # What the validation loss was measured on, for the report to say.
            "validation": "held-out images"
            if data.held_out
            else (
                "the training images at fixed noise and timesteps (fewer than "
                f"{HOLD_OUT_FROM} images: none held out)"
            ),
            "captions": data.captions,
            "buckets": bucket_counts(data.buckets),
            "val_indices": data.val_idx,
            "final_step": self.step,
            "resumed_from": self.resumed_from,
            "base_val_loss": self.base_val_loss,
            "val_loss": result.val_loss,
            "val_improvement": result.val_improvement,
            "val_history": result.val_history,
            "loss_history": result.loss_history,
            "sample_prompts": self.sample_prompts(),
            "sample_seeds": cfg.sample_seeds,
            "sample_sampler": self.sample_sampler,
            "prior_images": len(self.priors) if self.priors is not None else 0,
            "sample_steps": cfg.sample_steps,
            "header": metadata,
        }
        result.report = write_report(
            self.out_dir / "report",
            payload=payload,
            loss_history=result.loss_history,
            val_history=result.val_history,
            base_val_loss=self.base_val_loss,
            validation_label=(
                "validation (held out)" if data.held_out else "validation (training images)"
            ),
            base_images=base,
            trained_images=trained,
            labels=labels,
            checkpoint_rows=self._checkpoint_rows(result.step_versions, trained),
        )
        return result

    def _checkpoint_rows(
        self, versions: list[StepVersion], final: list[Any]
    ) -> list[tuple[str, list[Any]]]:
        """Grid rows, one a version: each checkpoint's samples, then the final images; each
        named by its number (the keycap a lead reacts with) and step."""
        from PIL import Image

        rows = [
            (version.step, [Image.open(p) for p in version.sample_images])
            for version in versions
            if all(p.exists() for p in version.sample_images)
        ]
        if not rows:
            return []
        rows.append((self.step, final))
        return [(f"{n}: step {step}", images) for n, (step, images) in enumerate(rows, 1)]

    def cleanup(self) -> None:
        """Hand the pipeline back as it came: no training adapter, no checkpointing, the
        text encoders on its device."""
        self.encoders.restore()
        if self.checkpointing_on:
            self.denoiser.disable_gradient_checkpointing()
        self.adapters.end_training()
        if self.token is not None:
            self.token.remove_hooks()
        self.denoiser.eval()
        self.denoiser.requires_grad_(False)
