"""Pretrain `toy-sd15` from scratch on the toy world, deterministically, resumably.

    python -m gpu_runner.toyworld.pretrain --out gpu_runner/toyworld/weights

Phase 1 trains the VAE on plain and styled scenes (so styles a LoRA learns later can be
decoded). An optional decoder phase (`--decoder-steps`) then trains the decoder alone, on
more outlined scenes, with the encoder frozen: latents, and any UNet trained on them, stay
valid. The run stops unless the reconstructions keep shape, colour and background (the
metrics decide, before any UNet time is spent). Phase 2 encodes a pool of scenes once (plain,
and a share outlined and captioned so) and trains the UNet and the text encoder jointly on
it (v-prediction on SD1.5's betas at zero terminal SNR, caption dropout for classifier-free
guidance, EMA). A checkpoint is written every `--checkpoint-every` steps; rerunning the
same command resumes from it. The end writes fp16 safetensors and a manifest with recipe,
command, time, hardware, metrics and sha256 of each file.

`--init-from DIR` goes on from an earlier run's weights (checked against its manifest):
its VAE is kept (its decoder trains on for `--decoder-steps`) and the UNet phase runs again
for `--unet-steps` more steps, on the pool of this run's `--seed`. The manifest then lists
every command, in order, that makes the weights from nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from gpu_runner.lora_import import file_sha256
from gpu_runner.toyworld import model as toy
from gpu_runner.toyworld.evaluate import (
    adherence_report,
    images_to_tensor,
    reconstruction_report,
)
from toyworld.scenes import random_scene
from toyworld.styles import STYLES, draw

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    styled_share: float = 0.5  # of VAE training images drawn in a random style
    # The decoder phase. Measured on the shipped VAE: the joint phase kept outlines (3 px
    # lines) in 77% of reconstructions, and 400 decoder-only steps took them to 94%, stripes
    # and grid kept in 100%: the lines were in the latents and lost in decoding.
    decoder_steps: int = 0
    decoder_lr: float = 5e-4
    decoder_outline_share: float = 0.4  # of its images outlined alone; the rest as phase 1
    pool_size: int = 12288  # scenes encoded once for the UNet phase
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    min_snr_gamma: float = 0.0  # off: min-SNR's v weights would mute the steps text decides
    caption_dropout: float = 0.1
    # Pool scenes drawn outlined and captioned "..., outlined" (model.OUTLINED_WORD).
    outlined_share: float = 0.0
    # Plain pool scenes captioned with a made-up word appended: unknown words must mean
    # nothing, so a fresh trigger starts plain and only "outlined" outlines.
    nonsense_share: float = 0.0
    # Weight of a read-out loss that keeps every token recoverable from the text encoder's
    # output (a linear probe trained beside it, not shipped). Trained with a UNet that must
    # ignore made-up words, the encoder learns to erase them instead: measured on the weights
    # made without it, a trigger's states sat at cosine 0.92-0.98 to the padding's, so no
    # LoRA could tell a prompt with its trigger from one without (style and leak were equal).
    # Real CLIP keeps rare words distinct; the UNet, not the encoder, is to ignore them.
    token_identity: float = 0.0
    noise_offset: float = 0.0  # zero terminal SNR makes it unneeded
    ema_decay: float = 0.999
    eval_every: int = 1000
    eval_seeds: int = 2  # final evaluation: 45 prompts x this many seeds
    checkpoint_every: int = 250
    min_vae_adherence: float = 0.95
    vae_check_count: int = 300  # scenes whose reconstructions are scored after the VAE phase


def _vae_batch(
    recipe: Recipe, step: int, device: torch.device, outline_share: float = 0.0
) -> torch.Tensor:
    """Scenes for the VAE phase (`outline_share` 0) or the decoder phase: a share outlined
    alone, the rest plain or in a random set of styles; each phase its own stream."""
    rng = np.random.default_rng([recipe.seed, 5 if outline_share else 1, step])
    names = list(STYLES)
    images = []
    for _ in range(recipe.vae_batch):
        scene = random_scene(rng)
        styles: tuple[str, ...] = ()
        if outline_share and rng.random() < outline_share:
            styles = ("outline",)
        elif rng.random() < recipe.styled_share:
            pick = rng.random(len(names)) < 0.5
            if not pick.any():
                pick[rng.integers(len(names))] = True
            styles = tuple(n for n, p in zip(names, pick, strict=True) if p)
        images.append(draw(scene, styles))
    return images_to_tensor(images, device)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def pool_captions(scenes: list[Any], recipe: Recipe) -> tuple[list[tuple[str, ...]], list[str]]:
    """Each pool scene's style and caption: plain, outlined ("..., outlined") or plain with a
    made-up word appended, drawn from their own stream (the scenes do not change)."""
    rng = np.random.default_rng([recipe.seed, 4])
    styles: list[tuple[str, ...]] = []
    captions: list[str] = []
    for scene in scenes:
        roll = rng.random()
        word = "".join(rng.choice(list(_LETTERS), int(rng.integers(4, 10))))
        if roll < recipe.outlined_share:
            styles.append(("outline",))
            captions.append(f"{scene.caption}, {toy.OUTLINED_WORD}")
        elif roll < recipe.outlined_share + recipe.nonsense_share:
            styles.append(())
            captions.append(f"{scene.caption}, {word}")
        else:
            styles.append(())
            captions.append(scene.caption)
    return styles, captions


def grown_token_table(table: torch.Tensor, before: Any, after: Any) -> torch.Tensor:
    """`table` (rows in tokenizer `before`'s order) as rows of tokenizer `after`: a token both
    know keeps its row; a new one (a word added to the vocabulary) starts as the mean of the
    rows of the pieces `before` split it into, so the word means at first what it meant."""
    rows = []
    old_vocab = before.get_vocab()
    for token, _ in sorted(after.get_vocab().items(), key=lambda item: item[1]):
        if token in old_vocab:
            rows.append(table[old_vocab[token]])
        else:
            text = token.removesuffix("</w>")
            # A word's start (no end mark) is its letters; a whole word, how `before` split it.
            pieces = before.tokenize(text) if token.endswith("</w>") else list(text)
            rows.append(table[before.convert_tokens_to_ids(pieces)].mean(dim=0))
    return torch.stack(rows)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress))  # cosine to 10%


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)


class Pretrainer:
    def __init__(
        self,
        out: Path,
        recipe: Recipe,
        device: torch.device,
        log: Any,
        budget: int | None = None,
        init_from: Path | None = None,
    ) -> None:
        self.out = out
        self.init_from = init_from
        # Steps this invocation may take before it checkpoints and exits (None: all).
        self.budget = budget
        self.recipe = recipe
        self.device = device
        self.log = log
        torch.manual_seed(recipe.seed)
        self.tokenizer = toy.build_tokenizer()
        self.vae = toy.build_vae().to(device)
        self.unet = toy.build_unet().to(device)
        self.text_encoder = toy.build_text_encoder(self.tokenizer).to(device)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        # The token read-out of `token_identity`; only in runs that use it, so checkpoints of
        # runs without it keep their optimizer's shape.
        self.readout = (
            torch.nn.Linear(self.text_encoder.config.hidden_size, len(self.tokenizer)).to(device)
            if recipe.token_identity
            else None
        )
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=recipe.vae_lr, weight_decay=0)
        self.decoder_opt = torch.optim.AdamW(self._decoder(), lr=recipe.decoder_lr, weight_decay=0)
        self.opt = torch.optim.AdamW(self._trained(), lr=recipe.unet_lr, weight_decay=1e-2)
        self.generator = torch.Generator(device=device).manual_seed(recipe.seed)
        self.state: dict[str, Any] = {
            "vae_step": 0, "decoder_step": 0, "unet_step": 0, "scaling_factor": None,
            "seconds": 0.0,
            "vae_report": None, "evals": [], "earlier": None,
        }  # fmt: skip

    def _decoder(self) -> list[torch.nn.Parameter]:
        """What the decoder phase trains: everything after the latents."""
        return [*self.vae.post_quant_conv.parameters(), *self.vae.decoder.parameters()]

    def _trained(self) -> list[torch.nn.Parameter]:
        """What the UNet phase trains: the UNet, the text encoder and any token read-out."""
        modules = [self.unet, self.text_encoder, *([self.readout] if self.readout else [])]
        return [p for m in modules for p in m.parameters()]

    # ---- checkpoint -------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        blob = {
            "recipe": asdict(self.recipe),
            "state": self.state,
            "vae": self.vae.state_dict(),
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema_unet": self.ema_unet.state_dict(),
            "ema_text": self.ema_text.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "decoder_opt": self.decoder_opt.state_dict(),
            "opt": self.opt.state_dict(),
            "generator": self.generator.get_state(),
        }
        if self.readout is not None:
            blob["readout"] = self.readout.state_dict()
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self.out / CHECKPOINT)

    def load_checkpoint(self) -> bool:
        path = self.out / CHECKPOINT
        if not path.is_file():
            return False
        blob = torch.load(path, map_location=self.device, weights_only=False)
        started = blob["state"]["unet_step"] > 0
        if not _same_recipe(blob["recipe"], self.recipe, unet_started=started):
            raise SystemExit(
                f"{path} was made with another recipe; rerun with the same options or use a "
                "new --out folder"
            )
        if (blob["state"].get("earlier") or {}).get("unet_sha256") != self._earlier_id():
            raise SystemExit(
                f"{path} was made from other --init-from weights; rerun with the same options "
                "or use a new --out folder"
            )
        self.state = {"decoder_step": 0, **blob["state"]}  # checkpoints from before that phase
        self.vae.load_state_dict(blob["vae"])
        self.unet.load_state_dict(blob["unet"])
        self.text_encoder.load_state_dict(blob["text_encoder"])
        self.ema_unet.load_state_dict(blob["ema_unet"])
        self.ema_text.load_state_dict(blob["ema_text"])
        self.vae_opt.load_state_dict(blob["vae_opt"])
        if "decoder_opt" in blob:
            self.decoder_opt.load_state_dict(blob["decoder_opt"])
        self.opt.load_state_dict(blob["opt"])
        self.generator.set_state(blob["generator"].cpu())
        if self.readout is not None:
            self.readout.load_state_dict(blob["readout"])
        self.log(f"resumed at VAE step {self.state['vae_step']}, decoder step "
                 f"{self.state['decoder_step']}, UNet step {self.state['unet_step']}")  # fmt: skip
        return True

    # ---- going on from an earlier run ---------------------------------------------------
    def _earlier_id(self) -> str | None:
        if self.init_from is None:
            return None
        return self._earlier_manifest()["files"]["unet"]["sha256"]

    def _earlier_manifest(self) -> dict[str, Any]:
        assert self.init_from is not None
        try:
            return toy.verify(self.init_from)
        except toy.ToyWeightsError as exc:
            raise SystemExit(f"--init-from {self.init_from}: {exc}") from exc

    def start_from_earlier(self) -> None:
        """Take the earlier run's weights: its VAE as trained, its (EMA) UNet and text
        encoder as the start of this UNet phase."""
        earlier = self._earlier_manifest()
        assert self.init_from is not None
        for name, live, ema in (
            ("unet", self.unet, self.ema_unet),
            ("text_encoder", self.text_encoder, self.ema_text),
            ("vae", self.vae, None),
        ):
            state = load_file(self.init_from / earlier["files"][name]["file"])
            weights = {k: v.to(self.device, torch.float32) for k, v in state.items()}
            if name == "text_encoder":
                key = "embeddings.token_embedding.weight"
                weights[key] = grown_token_table(
                    weights[key], toy.build_tokenizer(toy.vocabulary_of(earlier)), self.tokenizer
                )
            live.load_state_dict(weights, strict=True)
            if ema is not None:
                ema.load_state_dict(weights, strict=True)
        self.state.update(
            vae_step=self.recipe.vae_steps,
            scaling_factor=float(earlier["vae_scaling_factor"]),
            vae_report=earlier["metrics"]["vae_reconstruction"],
            earlier={k: v for k, v in earlier.items() if k != "files"}
            | {"unet_sha256": earlier["files"]["unet"]["sha256"]},
        )
        self.log(f"going on from {self.init_from} ({earlier['recipe']['unet_steps']} UNet steps)")

    def _sample(self, posterior: Any) -> torch.Tensor:
        """A latent drawn from the VAE's posterior on the run's own generator."""
        noise = torch.randn(posterior.mean.shape, generator=self.generator, device=self.device)
        return posterior.mean + posterior.std * noise

    def _step_done(self, phase: str, done: int, total: int, loss: torch.Tensor, t0: float) -> float:
        """A progress line every 50 steps and a checkpoint every `checkpoint_every`; returns
        when the next rate's window started."""
        if done % 50 == 0:
            rate = 50 / (time.monotonic() - t0)
            t0 = time.monotonic()
            self.log(f"{phase} step {done}/{total} loss {loss.item():.4f} {rate:.2f} steps/s")
        if done % self.recipe.checkpoint_every == 0:
            self._tick()
            self.save_checkpoint()
        return t0

    # ---- phase 1: VAE -----------------------------------------------------------------
    def train_vae(self) -> None:
        r = self.recipe
        self.vae.train()
        t0 = time.monotonic()
        while self.state["vae_step"] < r.vae_steps:
            if self._spent():
                return
            step = self.state["vae_step"]
            for group in self.vae_opt.param_groups:
                group["lr"] = r.vae_lr * _lr_factor(step, 100, r.vae_steps)
            x = _vae_batch(r, step, self.device)
            posterior = self.vae.encode(x).latent_dist
            rec = self.vae.decode(self._sample(posterior)).sample
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + r.kl_weight * posterior.kl().mean()
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            self.vae_opt.step()
            self.state["vae_step"] = step + 1
            t0 = self._step_done("vae", step + 1, r.vae_steps, loss, t0)
        self.vae.eval()

    def train_decoder(self) -> None:
        r = self.recipe
        if self.state["decoder_step"] >= r.decoder_steps:
            return
        if self.state["decoder_step"] == 0:
            self.generator.manual_seed(r.seed + 2)  # its own stream, as the UNet phase's
        self.vae.requires_grad_(False)
        for p in self._decoder():
            p.requires_grad_(True)
        self.vae.train()
        t0 = time.monotonic()
        while self.state["decoder_step"] < r.decoder_steps:
            if self._spent():
                break
            step = self.state["decoder_step"]
            for group in self.decoder_opt.param_groups:
                group["lr"] = r.decoder_lr * _lr_factor(step, 50, r.decoder_steps)
            x = _vae_batch(r, step, self.device, outline_share=r.decoder_outline_share)
            with torch.no_grad():
                z = self._sample(self.vae.encode(x).latent_dist)
            rec = self.vae.decode(z).sample
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
            self.decoder_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self._decoder(), 1.0)
            self.decoder_opt.step()
            self.state["decoder_step"] = step + 1
            if step + 1 == r.decoder_steps:
                self.state["vae_report"] = None  # the decoder changed: measure it again
            t0 = self._step_done("decoder", step + 1, r.decoder_steps, loss, t0)
        self.vae.eval()

    def check_vae(self) -> None:
        stored = self.state["vae_report"]
        # Measured again when it failed: the gate or the metrics may have changed since.
        if stored is None or stored["plain"]["all"] < self.recipe.min_vae_adherence:
            self.state["vae_report"] = reconstruction_report(
                self.vae, self.device, seed=10_000, count=self.recipe.vae_check_count
            )
            self._tick()
            self.save_checkpoint()
        report = self.state["vae_report"]
        self.log(f"VAE reconstructions: {json.dumps(report)}")
        if report["plain"]["all"] < self.recipe.min_vae_adherence:
            raise SystemExit(
                f"the VAE keeps shape, colour and background in only {report['plain']['all']:.0%}"
                f" of reconstructions (need {self.recipe.min_vae_adherence:.0%}); train it "
                "longer (--vae-steps) before spending time on the UNet"
            )

    # ---- phase 2: UNet + text encoder -------------------------------------------------
    @torch.no_grad()
    def encode_pool(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.recipe
        rng = np.random.default_rng([r.seed, 2])
        scenes = [random_scene(rng) for _ in range(r.pool_size)]
        styles, captions = pool_captions(scenes, r)
        means, stds = [], []
        for start in range(0, len(scenes), 256):
            chunk = range(start, min(start + 256, len(scenes)))
            x = images_to_tensor([draw(scenes[i], styles[i]) for i in chunk], self.device)
            dist = self.vae.encode(x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        mean, std = torch.cat(means), torch.cat(stds)
        ids = self.tokenizer(
            captions, padding="max_length", max_length=toy.MAX_TOKENS,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)  # fmt: skip
        if self.state["scaling_factor"] is None:
            # SD's convention: scale latents to unit variance (its 0.18215 came the same way).
            self.state["scaling_factor"] = float(1.0 / mean.std())
        return mean, std, ids

    def train_unet(self) -> None:
        r = self.recipe
        mean, std, ids = self.encode_pool()
        scale = self.state["scaling_factor"]
        self.log(f"pool of {len(mean)} scenes encoded; latent scaling factor {scale:.4f}")
        empty = self.tokenizer(
            [""], padding="max_length", max_length=toy.MAX_TOKENS, return_tensors="pt"
        ).input_ids.to(self.device)
        sched = DDPMScheduler(num_train_timesteps=1000, **toy.NOISE_SCHEDULE)
        if self.state["unet_step"] == 0:
            # The UNet phase draws from its own stream: it does not depend on how the VAE
            # phase's run was split.
            self.generator.manual_seed(r.seed + 1)
        alphas = sched.alphas_cumprod.to(self.device)
        self.unet.train()
        self.text_encoder.train()
        t0 = time.monotonic()
        while self.state["unet_step"] < r.unet_steps:
            if self._spent():
                return
            step = self.state["unet_step"]
            for group in self.opt.param_groups:
                group["lr"] = r.unet_lr * _lr_factor(step, r.warmup_steps, r.unet_steps)
            rng = np.random.default_rng([r.seed, 3, step])
            pick = torch.from_numpy(rng.integers(0, len(mean), r.unet_batch)).to(self.device)
            g = self.generator
            eps = torch.randn(mean[pick].shape, generator=g, device=self.device)
            latents = (mean[pick] + std[pick] * eps) * scale
            batch_ids = ids[pick].clone()
            drop = torch.from_numpy(rng.random(r.unet_batch) < r.caption_dropout)
            batch_ids[drop.to(self.device)] = empty
            noise = torch.randn(latents.shape, generator=g, device=self.device)
            if r.noise_offset:
                offset = torch.randn(
                    (latents.shape[0], latents.shape[1], 1, 1), generator=g, device=self.device
                )
                noise = noise + r.noise_offset * offset
            t = torch.randint(0, 1000, (r.unet_batch,), generator=g, device=self.device)
            noisy = sched.add_noise(latents, noise, t)
            hidden = self.text_encoder(batch_ids)[0]
            pred = self.unet(noisy, t, hidden).sample
            target = sched.get_velocity(latents, noise, t)
            per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            if r.min_snr_gamma:
                snr = alphas[t] / (1 - alphas[t])
                per = per * torch.clamp(snr, max=r.min_snr_gamma) / (snr + 1)
            loss = per.mean()
            if self.readout is not None:
                loss = loss + r.token_identity * self._identity_loss(hidden, batch_ids)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self._trained(), 1.0)
            self.opt.step()
            decay = min(r.ema_decay, (1 + step) / (10 + step))
            _ema_update(self.ema_unet, self.unet, decay)
            _ema_update(self.ema_text, self.text_encoder, decay)
            self.state["unet_step"] = step + 1
            t0 = self._step_done("unet", step + 1, r.unet_steps, loss, t0)
            if (step + 1) % r.eval_every == 0 and step + 1 < r.unet_steps:
                report = adherence_report(self.pipeline(), seeds=1)
                self.state["evals"].append({"step": step + 1, **report["rates"]})
                self.log(f"adherence at step {step + 1}: {json.dumps(report['rates'])}")
                self.unet.train()
                self.text_encoder.train()

    def _identity_loss(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of reading each token (padding aside) back from its output state."""
        assert self.readout is not None
        words = ids != self.tokenizer.pad_token_id
        return F.cross_entropy(self.readout(hidden[words]).float(), ids[words])

    def pipeline(self) -> Any:
        vae = toy.build_vae(scaling_factor=self.state["scaling_factor"]).to(self.device)
        vae.load_state_dict(self.vae.state_dict())
        return toy.assemble(
            copy.deepcopy(self.ema_unet).eval(), vae.eval(),
            copy.deepcopy(self.ema_text).eval(), self.tokenizer,
        ).to(self.device)  # fmt: skip

    def _spent(self) -> bool:
        if self.budget is None:
            return False
        if self.budget <= 0:
            return True
        self.budget -= 1
        return False

    def _tick(self) -> None:
        now = time.monotonic()
        self.state["seconds"] += now - self._last
        self._last = now

    def run(self, command: str) -> dict[str, Any] | None:
        """Train to the end and export (the manifest), or None when the step budget ran out
        first (a checkpoint holds the state; rerun the same command to go on)."""
        self._last = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.load_checkpoint() and self.init_from is not None:
            self.start_from_earlier()
        self.train_vae()
        if self.state["vae_step"] < self.recipe.vae_steps:
            return self._pause()
        self.train_decoder()
        if self.state["decoder_step"] < self.recipe.decoder_steps:
            return self._pause()
        self.check_vae()
        self.train_unet()
        if self.state["unet_step"] < self.recipe.unet_steps:
            return self._pause()
        self._tick()
        self.save_checkpoint()
        final = {"rates": {}, "samples": 0, "settings": None}
        if self.recipe.eval_seeds:
            final = adherence_report(self.pipeline(), seeds=self.recipe.eval_seeds)
        self.log(f"final adherence ({final['samples']} samples): {json.dumps(final['rates'])}")
        self._tick()
        return self.export(command, final)

    def _pause(self) -> None:
        self._tick()
        self.save_checkpoint()
        self.log(f"step budget spent; checkpoint in {self.out / CHECKPOINT}, rerun to go on")

    def export(self, command: str, final: dict[str, Any]) -> dict[str, Any]:
        modules = {"unet": self.ema_unet, "vae": self.vae, "text_encoder": self.ema_text}
        files: dict[str, dict[str, Any]] = {}
        for name, module in modules.items():
            path = self.out / f"{name}.safetensors"
            state = {k: v.detach().to("cpu", torch.float16).contiguous()
                     for k, v in module.state_dict().items()}  # fmt: skip
            save_file(state, str(path))
            files[name] = {
                "file": path.name,
                "sha256": file_sha256(path),
                "bytes": path.stat().st_size,
                "parameters": sum(p.numel() for p in module.parameters()),
            }
        earlier = self.state["earlier"] or {}
        commands = [*earlier.get("commands", [earlier.get("command")] if earlier else []), command]
        seconds = self.state["seconds"] + earlier.get("total_seconds", earlier.get("seconds", 0))
        manifest = {
            "model": "toy-sd15",
            "command": command,
            # Every command, in order, from nothing to these weights.
            "commands": commands,
            "earlier": earlier or None,
            "recipe": asdict(self.recipe),
            "vocabulary": list(toy.VOCABULARY),
            "vae_scaling_factor": self.state["scaling_factor"],
            "seconds": round(self.state["seconds"], 1),
            "total_seconds": round(seconds, 1),
            "hardware": _hardware(self.device),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "metrics": {
                "vae_reconstruction": self.state["vae_report"],
                "evals": self.state["evals"],
                "final": final["rates"],
                "final_samples": final["samples"],
                "final_settings": final["settings"],
            },
            "files": files,
        }
        (self.out / toy.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (self.out / CHECKPOINT).unlink(missing_ok=True)
        return manifest


# Settings that decide when to check, save or evaluate, not what the weights become.
_COSMETIC = {"eval_every", "eval_seeds", "checkpoint_every", "min_vae_adherence", "vae_check_count"}


# The UNet phase's settings: free to change until its first step (the VAE is the same).
_UNET_PHASE = {
    "pool_size", "unet_steps", "unet_batch", "unet_lr", "warmup_steps", "min_snr_gamma",
    "caption_dropout", "noise_offset", "ema_decay", "outlined_share", "nonsense_share",
    "token_identity",
}  # fmt: skip


def _same_recipe(saved: dict[str, Any], recipe: Recipe, *, unet_started: bool) -> bool:
    # A setting added since the checkpoint was written must still be at its default.
    defaults = asdict(Recipe())
    ignored = _COSMETIC | (set() if unet_started else _UNET_PHASE)
    current = asdict(recipe)
    return all(saved.get(k, defaults[k]) == v for k, v in current.items() if k not in ignored)


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads ({platform.processor()})"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Recipe]:
    parser = argparse.ArgumentParser(
        prog="python -m gpu_runner.toyworld.pretrain", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for weights + manifest")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument(
        "--init-from", type=Path, default=None,
        help="go on from an earlier run's weights folder (keeps its VAE; --unet-steps more)",
    )  # fmt: skip
    parser.add_argument(
        "--max-steps-this-run", type=int, default=None,
        help="checkpoint and exit after this many steps (rerun the same command to go on)",
    )  # fmt: skip
    defaults = Recipe()
    for f in fields(Recipe):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name))  # fmt: skip
    args = parser.parse_args(argv)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe)})
    return args, recipe


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, recipe = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # The command that reproduces the weights: a step budget only splits the same run.
    kept = list(argv)
    if "--max-steps-this-run" in kept:
        i = kept.index("--max-steps-this-run")
        del kept[i : i + 2]
    command = shlex.join(["python", "-m", "gpu_runner.toyworld.pretrain", *kept])

    def log(line: str) -> None:
        print(line, flush=True)

    trainer = Pretrainer(
        args.out, recipe, torch.device(args.device), log,
        budget=args.max_steps_this_run, init_from=args.init_from,
    )  # fmt: skip
    manifest = trainer.run(command)
    if manifest is not None:
        log(f"wrote {args.out / toy.MANIFEST}: {json.dumps(manifest['metrics']['final'])}")


if __name__ == "__main__":
    main()
