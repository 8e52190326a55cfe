"""`toy-sd15`: the shipped weights match their manifest and load as a built-in base model;
the pretraining command runs end to end, resumes from its checkpoint, and is deterministic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.runner
torch = pytest.importorskip("torch")

from gpu_runner.toyworld import model as toy  # noqa: E402
from gpu_runner.toyworld.pretrain import CHECKPOINT, main  # noqa: E402

SMOKE = [
    "--vae-steps", "3", "--vae-batch", "4", "--unet-steps", "3", "--unet-batch", "4",
    "--pool-size", "32", "--checkpoint-every", "2", "--eval-every", "100", "--eval-seeds", "0",
    "--min-vae-adherence", "0", "--vae-check-count", "8", "--threads", "1",
]  # fmt: skip


def test_shipped_weights_match_the_manifest() -> None:
    manifest = toy.verify()
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    assert total <= 20 * 1024 * 1024
    assert manifest["command"].startswith("python -m gpu_runner.toyworld.pretrain --out ")
    assert {"recipe", "seconds", "hardware", "metrics", "vae_scaling_factor"} <= set(manifest)
    assert manifest["metrics"]["final_samples"] == 90


def test_a_changed_weight_file_is_refused(tmp_path: Path) -> None:
    for entry in toy.read_manifest()["files"].values():
        (tmp_path / entry["file"]).write_bytes((toy.WEIGHTS_DIR / entry["file"]).read_bytes())
    (tmp_path / toy.MANIFEST).write_text((toy.WEIGHTS_DIR / toy.MANIFEST).read_text())
    unet = tmp_path / "unet.safetensors"
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF
    unet.write_bytes(bytes(data))
    with pytest.raises(toy.ToyWeightsError, match="does not match its manifest"):
        toy.build_toy_sd15_pipeline(tmp_path)


def test_toy_sd15_is_a_builtin_base_model() -> None:
    from gpu_runner.devices import DeviceChoice
    from gpu_runner.pipelines import BaseModelSpec, load_pipeline

    loaded = load_pipeline(
        BaseModelSpec("toy-sd15", "toy-sd15"), DeviceChoice("cpu", torch.float32)
    )
    assert loaded.family == "sd15" and loaded.spec.kind == "builtin"
    assert loaded.pipe.unet.config.in_channels == toy.LATENT_CHANNELS


def _sha(out: Path) -> dict[str, str]:
    manifest = json.loads((out / toy.MANIFEST).read_text())
    return {name: entry["sha256"] for name, entry in manifest["files"].items()}


# With the token read-out too: its weights and optimizer state travel in the checkpoint;
# with a decoder phase, the split falls inside it.
@pytest.mark.parametrize(
    ("extra", "resumed"),
    [
        ([], "decoder step 0, UNet step 1"),
        (["--token-identity", "0.5"], "decoder step 0, UNet step 1"),
        (["--decoder-steps", "2"], "decoder step 1, UNet step 0"),
    ],
    ids=["plain", "readout", "decoder"],
)
def test_pretraining_runs_resumes_and_repeats_itself(
    tmp_path: Path, capsys: Any, extra: list[str], resumed: str
) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    main(["--out", str(whole), *SMOKE, *extra])
    main(["--out", str(split), *SMOKE, *extra, "--max-steps-this-run", "4"])  # VAE + 1 step
    assert (split / CHECKPOINT).is_file() and not (split / toy.MANIFEST).exists()
    main(["--out", str(split), *SMOKE, *extra])
    log = capsys.readouterr().out
    assert f"resumed at VAE step 3, {resumed}" in log
    assert not (split / CHECKPOINT).exists()
    assert _sha(split) == _sha(whole)  # deterministic, interrupted or not
    manifest = json.loads((split / toy.MANIFEST).read_text())
    assert "--max-steps-this-run" not in manifest["command"]
    assert manifest["recipe"]["unet_steps"] == 3
    assert set(manifest["metrics"]["vae_reconstruction"]) == {"plain", "stripes", "outline", "grid"}
    # The files load as the toy model does.
    toy.build_toy_sd15_pipeline(split)


def test_pretraining_pool_knows_one_style_word_and_ignores_made_up_ones() -> None:
    from gpu_runner.toyworld.model import OUTLINED_WORD
    from gpu_runner.toyworld.pretrain import Recipe, pool_captions
    from toyworld.metrics import read
    from toyworld.scenes import random_scenes
    from toyworld.styles import draw

    scenes = random_scenes(3, 400)
    styles, captions = pool_captions(scenes, Recipe(outlined_share=0.2, nonsense_share=0.3))
    outlined = [i for i, c in enumerate(captions) if c.endswith(f", {OUTLINED_WORD}")]
    made_up = [i for i, c in enumerate(captions) if c != scenes[i].caption and i not in outlined]
    assert 0.12 < len(outlined) / 400 < 0.28 and 0.22 < len(made_up) / 400 < 0.38
    # Exactly the "outlined" captions show outlines; a made-up word leaves the scene plain.
    assert all(read(draw(scenes[i], styles[i])).shows("outline") for i in outlined)
    assert all(styles[i] == () for i in range(400) if i not in outlined)
    words = {captions[i].rsplit(", ", 1)[1] for i in made_up}
    assert len(words) > 0.9 * len(made_up) and not words & set(toy.VOCABULARY)
    assert pool_captions(scenes, Recipe()) == ([()] * 400, [s.caption for s in scenes])


def test_pretraining_goes_on_from_earlier_weights(tmp_path: Path, capsys: Any) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    main(["--out", str(first), *SMOKE])
    more = ["--init-from", str(first), "--seed", "1", "--unet-steps", "2"]
    main(["--out", str(second), *SMOKE, *more])
    assert "going on from" in capsys.readouterr().out
    before = json.loads((first / toy.MANIFEST).read_text())
    after = json.loads((second / toy.MANIFEST).read_text())
    # The VAE is the earlier run's, bit for bit; the UNet trained on.
    assert after["files"]["vae"]["sha256"] == before["files"]["vae"]["sha256"]
    assert after["files"]["unet"]["sha256"] != before["files"]["unet"]["sha256"]
    assert after["vae_scaling_factor"] == before["vae_scaling_factor"]
    # The manifest says how to make these weights from nothing: both commands, in order.
    assert after["commands"] == [before["command"], after["command"]]
    assert after["earlier"]["unet_sha256"] == before["files"]["unet"]["sha256"]
    assert after["total_seconds"] >= after["seconds"]
    toy.build_toy_sd15_pipeline(second)
    # A checkpoint made from one set of earlier weights does not resume from another.
    main(["--out", str(tmp_path / "third"), *SMOKE, *more, "--max-steps-this-run", "1"])
    with pytest.raises(SystemExit, match="other --init-from weights"):
        main(["--out", str(tmp_path / "third"), *SMOKE, "--seed", "1", "--unet-steps", "2",
              "--init-from", str(second)])  # fmt: skip


def test_the_decoder_phase_trains_the_decoder_and_leaves_the_latents(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    main(["--out", str(first), *SMOKE])
    more = ["--init-from", str(first), "--decoder-steps", "3", "--unet-steps", "0"]
    main(["--out", str(second), *SMOKE, *more])
    before, after = (load_file(folder / "vae.safetensors") for folder in (first, second))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # The encoder, and so every latent a UNet was trained on, is the earlier run's.
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert any(k.startswith("decoder.") for k in changed)
    manifest = json.loads((second / toy.MANIFEST).read_text())
    assert manifest["recipe"]["decoder_steps"] == 3
    # Its UNet is the earlier run's: no UNet step was taken.
    earlier = json.loads((first / toy.MANIFEST).read_text())
    assert manifest["files"]["unet"]["sha256"] == earlier["files"]["unet"]["sha256"]


def test_the_shipped_text_encoder_keeps_a_made_up_word_distinct() -> None:
    # A trigger is a made-up word. Were its states the padding's, as an encoder trained to
    # make such words mean nothing had them (cosine 0.92-0.98), a prompt with the trigger
    # would read as one without it, and no LoRA could keep its style to its trigger.
    pipe = toy.build_toy_sd15_pipeline()
    tokenizer = pipe.tokenizer
    ids = tokenizer(
        ["a red circle on a white background, zxstripes"], padding="max_length",
        max_length=toy.MAX_TOKENS, return_tensors="pt",
    ).input_ids  # fmt: skip
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0][0]
    row = ids[0].tolist()
    end = row.index(tokenizer.eos_token_id)
    word = states[row.index(tokenizer.convert_tokens_to_ids(",</w>")) + 1 : end]
    padding = states[end + 4]
    similarity = torch.nn.functional.cosine_similarity(word, padding[None], dim=-1)
    assert len(word) >= 3 and similarity.max() < 0.8, similarity


def test_a_word_added_to_the_vocabulary_starts_as_what_its_pieces_meant() -> None:
    from gpu_runner.toyworld.pretrain import grown_token_table

    before = toy.build_tokenizer(toy.FIRST_VOCABULARY)
    after = toy.build_tokenizer()
    assert after.tokenize(f"a red circle, {toy.OUTLINED_WORD}")[-1] == f"{toy.OUTLINED_WORD}</w>"
    table = torch.randn(len(before), 8)
    grown = grown_token_table(table, before, after)
    assert grown.shape == (len(after), 8)
    old, new = before.get_vocab(), after.get_vocab()
    # Known tokens keep their rows even where their ids moved (the end-of-text token did).
    assert new[after.eos_token] != old[before.eos_token]
    for token in (after.eos_token, "red</w>", "o", "d</w>"):
        assert torch.equal(grown[new[token]], table[old[token]])
    pieces = before.convert_tokens_to_ids(before.tokenize(toy.OUTLINED_WORD))
    assert len(pieces) > 1
    assert torch.allclose(grown[new[f"{toy.OUTLINED_WORD}</w>"]], table[pieces].mean(dim=0))
