"""Image decoding and FLIP's training augmentation, seeded per sample so a resumed stream repeats it.

torchvision's RandomResizedCrop and RandomHorizontalFlip draw from torch's global generator; each
sample runs them inside `torch.random.fork_rng` seeded from the stream's own generator, so the
global state is untouched and a sample's crop depends on (seed, rank, worker, position) only.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from flip_ds.data.reader import Skip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decode_image(data: bytes, min_side: float = 0.0) -> Image.Image:
    """RGB image from encoded bytes; raises Skip('corrupt_image') for anything PIL cannot decode.

    With `min_side`, a JPEG is decoded at a reduced DCT scale (1/2, 1/4, 1/8) while both sides stay at
    least `min_side`: a 256-px JPEG for a 64-px crop decodes several times faster.
    """
    try:
        image = Image.open(io.BytesIO(data))
        if min_side > 0:
            factor = min(image.size) / min_side
            if factor >= 2:
                image.draft("RGB", (math.ceil(image.width / factor), math.ceil(image.height / factor)))
        return image.convert("RGB")  # forces the full decode, so truncated data fails here
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, struct.error... on hostile bytes
        raise Skip("corrupt_image") from None


class TrainAugment:
    """RandomResizedCrop(image_size, scale, ratio) then a horizontal flip, on PIL images."""

    def __init__(self, image_size: int, scale: tuple[float, float], ratio: tuple[float, float], hflip: bool) -> None:
        steps: list = [T.RandomResizedCrop(image_size, scale=scale, ratio=ratio,
                                           interpolation=T.InterpolationMode.BICUBIC)]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        self.transform = T.Compose(steps)
        self.image_size = image_size
        # The smallest crop side relative to the image's smaller side: decode no smaller than that.
        self.min_crop_fraction = math.sqrt(scale[0] * min(ratio[0], 1 / ratio[1]))

    def decode(self, data: bytes) -> Image.Image:
        return decode_image(data, self.image_size / self.min_crop_fraction)

    def __call__(self, image: Image.Image, seed: int) -> np.ndarray:
        """(image_size, image_size, 3) uint8."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also seeds (and probes) CUDA
            return np.asarray(self.transform(image))


def to_planar(images: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 images to one (B, 3, H, W) uint8 batch: what loader workers hand over (a
    quarter of float32's bytes through shared memory and to the GPU)."""
    return torch.from_numpy(np.stack([image.transpose(2, 0, 1) for image in images]))


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, H, W) uint8 images, CLIP-normalised in `dtype` on their own device (the GPU, in training)."""
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    return images.float().mul_(1 / (255 * std)).sub_(mean / std).to(dtype)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised images back to [0, 1] pixels (for showing them)."""
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    return images.float() * std + mean
