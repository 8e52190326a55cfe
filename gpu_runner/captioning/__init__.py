"""Auto-captions for reference images with a local image-to-text model through
transformers. Captions come back with source="auto"; storage decides never to overwrite
a caption a person wrote."""

from gpu_runner.captioning.base import Caption, CaptionError, ImageInput
from gpu_runner.captioning.captioner import Captioner
from gpu_runner.captioning.kinds import KINDS, supported

__all__ = ["KINDS", "Caption", "CaptionError", "Captioner", "ImageInput", "supported"]
