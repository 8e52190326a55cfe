"""Auto-captioning through tiny models of every supported kind (BLIP, Florence-2, Qwen2-,
Qwen2.5- and Qwen3-VL), each saved to and loaded from a folder like a real one."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytest_plugins = ("generation_fixtures",)
pytestmark = pytest.mark.runner


# gpu_runner.captioning.tiny.TINY_KINDS, spelled out so collecting needs no torch.
KINDS = ["blip", "florence2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="session")
def tiny_captioners(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gpu_runner.captioning.tiny import TINY_KINDS, save_tiny_captioner

    root = tmp_path_factory.mktemp("captioners")
    return {kind: save_tiny_captioner(root / f"tiny-{kind}", kind) for kind in TINY_KINDS}


@pytest.fixture(scope="session")
def blip_dir(tiny_captioners: dict[str, Path]) -> Path:
    return tiny_captioners["blip"]


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_captions_each_image_in_order(
    kind: str, tiny_captioners: dict[str, Path], cpu_choice: Any, tmp_path: Path
) -> None:
    from gpu_runner.captioning import Captioner

    folder = tiny_captioners[kind]
    assert json.loads((folder / "config.json").read_text())["model_type"] == kind
    captioner = Captioner(folder, cpu_choice, max_new_tokens=8, num_beams=1, batch_size=2)
    on_disk = tmp_path / "blue.png"
    on_disk.write_bytes(_png((0, 0, 255)))
    # Three sizes and sources, in two batches of at most 2.
    images = [_png((255, 0, 0)), Image.new("RGB", (64, 64), (0, 255, 0)), on_disk]
    captions = captioner.caption(images)
    assert len(captions) == 3
    for caption in captions:
        assert isinstance(caption.text, str) and caption.text.strip()
        assert caption.source == "auto" and caption.error is None
        assert caption.model == f"tiny-{kind}"
    # Deterministic: the same image gets the same caption, alone or in a batch.
    assert captioner.caption([images[0]])[0].text == captions[0].text


def test_unreadable_image_gets_an_error_not_a_crash(blip_dir: Path, cpu_choice: Any) -> None:
    from gpu_runner.captioning import Captioner

    captioner = Captioner(blip_dir, cpu_choice, max_new_tokens=8, num_beams=1)
    captions = captioner.caption([b"not an image at all", _png((1, 2, 3))])
    assert captions[0].text == "" and "unreadable image" in (captions[0].error or "")
    assert captions[1].error is None and captions[1].text


def test_prompt_prefix_is_removed(blip_dir: Path, cpu_choice: Any) -> None:
    from gpu_runner.captioning import Captioner

    prompted = Captioner(blip_dir, cpu_choice, prompt="a photo of", max_new_tokens=6, num_beams=1)
    (caption,) = prompted.caption([_png((200, 100, 50))])
    assert not caption.text.lower().startswith("a photo of")


def test_missing_model_folder_is_explained(tmp_path: Path, cpu_choice: Any) -> None:
    from gpu_runner.captioning import Captioner, CaptionError

    with pytest.raises(CaptionError, match="no captioning model in") as err:
        Captioner(tmp_path / "nothing", cpu_choice).caption([_png((0, 0, 0))])
    assert "BLIP" in str(err.value) and "Florence-2" in str(err.value)


def test_an_unsupported_kind_is_refused_naming_the_supported_ones(
    tmp_path: Path, cpu_choice: Any
) -> None:
    from gpu_runner.captioning import Captioner, CaptionError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CaptionError) as err:
        Captioner(tmp_path, cpu_choice).caption([_png((0, 0, 0))])
    message = str(err.value)
    assert "'llava'" in message
    for kind in ("BLIP", "Florence-2", "Qwen-VL"):
        assert kind in message


def test_a_broken_folder_of_a_known_kind_says_how_to_save_one(
    tmp_path: Path, cpu_choice: Any
) -> None:
    from gpu_runner.captioning import Captioner, CaptionError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "florence2"}))
    with pytest.raises(CaptionError, match=r"Florence-2 captioning model .* could not be loaded"):
        Captioner(tmp_path, cpu_choice).caption([_png((0, 0, 0))])
