"""Aspect-ratio buckets: every reference trains at about the family's training area in its
own shape, cropped as little as possible, instead of centre-cropped to a square.

The scheme is kohya sd-scripts' (its BucketManager and make_bucket_resolutions): sides in
steps of 64 px between half and twice the training side, each bucket the largest of its
width within the training area, both orientations; an image goes to the bucket nearest its
aspect ratio. A batch is drawn from one bucket, so its latents stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# kohya's bucket_reso_steps.
BUCKET_STEP = 64
# kohya's min_bucket_reso 256 and max_bucket_reso 1024 at its 512 px default: half and
# twice the training side.
MIN_SIDE_SHARE = 0.5
MAX_SIDE_SHARE = 2.0
# The most an image is enlarged to fill its bucket; a smaller image gets a bucket of its own
# shape at this enlargement (kohya's bucket_no_upscale keeps small images unenlarged; twice
# keeps a 512 px reference usable at 1024 px without inventing four times its pixels).
MAX_UPSCALE = 2.0


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"


def bucket_step(resolution: int, grid: int) -> int:
    """kohya's 64 px, or a quarter of a small training side (the built-in models train at
    32-64 px) so that wide and tall buckets exist there too; always on the family's grid."""
    step = min(BUCKET_STEP, resolution // 4)
    return max(grid, step // grid * grid)


def make_buckets(resolution: int, grid: int) -> list[Bucket]:
    """Every bucket for a training side: the square itself, and each width in steps with
    the tallest height that keeps the area within resolution², in both orientations."""
    step = bucket_step(resolution, grid)
    area = resolution * resolution
    low = max(step, int(resolution * MIN_SIDE_SHARE) // step * step)
    high = int(resolution * MAX_SIDE_SHARE) // step * step
    found = {Bucket(resolution, resolution)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            found |= {Bucket(width, height), Bucket(height, width)}
    return sorted(found)


def nearest_bucket(width: int, height: int, buckets: list[Bucket], grid: int) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (on a log scale, so wide and tall
    are alike; ties go to the larger area). An image too small to fill it without enlarging
    more than MAX_UPSCALE gets a bucket of its own shape at that enlargement."""
    aspect = math.log(width / height)
    best = min(
        buckets, key=lambda b: (abs(math.log(b.width / b.height) - aspect), -b.width * b.height)
    )
    if width * height * MAX_UPSCALE**2 >= best.width * best.height:
        return best
    step = grid
    return Bucket(
        max(step, int(width * MAX_UPSCALE) // step * step),
        max(step, int(height * MAX_UPSCALE) // step * step),
    )


def crop_box(width: int, height: int, bucket: Bucket) -> tuple[tuple[int, int], int, int]:
    """(resized size, crop top, crop left): the image scaled to cover the bucket, then the
    overhang cut evenly from both sides, so as little as possible is lost."""
    scale = max(bucket.width / width, bucket.height / height)
    size = (max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale)))
    return size, (size[1] - bucket.height) // 2, (size[0] - bucket.width) // 2


def bucket_counts(buckets: list[Bucket]) -> dict[str, int]:
    """How many images went to each bucket, largest first, for the report and chat."""
    counts: dict[Bucket, int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {b.label: n for b, n in ordered}
