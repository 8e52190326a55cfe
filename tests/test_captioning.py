"""Auto-captioning through a tiny BLIP saved to and loaded from a folder like a real one."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytest_plugins = ("generation_fixtures",)
pytestmark = pytest.mark.runner


@pytest.fixture(scope="session")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpu_runner.captioning import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


@pytest.fixture(scope="session")
def captioner(blip_dir: Path, cpu_choice: Any) -> Any:
    from gpu_runner.captioning import Captioner

    return Captioner(blip_dir, cpu_choice, max_new_tokens=8, num_beams=1, batch_size=2)


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_captions_each_image_in_order(captioner: Any, tmp_path: Path) -> None:
    on_disk = tmp_path / "blue.png"
    on_disk.write_bytes(_png((0, 0, 255)))
    images = [_png((255, 0, 0)), Image.new("RGB", (64, 64), (0, 255, 0)), on_disk]
    captions = captioner.caption(images)
    assert len(captions) == 3
    for caption in captions:
        assert isinstance(caption.text, str) and caption.text.strip()
        assert caption.source == "auto" and caption.error is None
        assert caption.model == "tiny-blip"
    # Deterministic: the same image gets the same caption.
    assert captioner.caption([images[0]])[0].text == captions[0].text


def test_unreadable_image_gets_an_error_not_a_crash(captioner: Any) -> None:
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

    with pytest.raises(CaptionError, match="no captioning model in"):
        Captioner(tmp_path / "nothing", cpu_choice).caption([_png((0, 0, 0))])
