"""JPEGs shaped like img2dataset's LAION output, cut from real photographs, for `flip-ds bench-data`.

img2dataset's default (resize_mode keep_ratio, image_size 256) stores each image with its shorter
side at 256 px, JPEG quality 95. Decoding cost depends on that size and on the content (a flat
colour compresses to almost nothing), so this cuts random crops of various aspect ratios out of
the two photographs scikit-learn ships (load_sample_images: a temple, a flower), resizes each to
a 256-px shorter side and writes it at quality 95, with a captions CSV for `flip-ds make-shards`:

    python tools/laion_like_images.py --out /tmp/laion_like --count 2000
    flip-ds make-shards --captions /tmp/laion_like/captions.csv --images /tmp/laion_like \\
        --out /tmp/laion_like/shards --samples-per-shard 500
    flip-ds bench-data --shards '/tmp/laion_like/shards/{00000..00003}.tar' --tokenizer TOKENIZER.model \\
        --recipe configs/flip_h14_laion2b_25.6b.yaml --gpus 256
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the JPEGs and captions.csv")
    parser.add_argument("--count", type=int, default=2000, help="images to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    photos = load_sample_images()
    names = [Path(f).stem for f in photos.filenames]
    with open(args.out / "captions.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["path", "caption"])
        for i in range(args.count):
            k = int(rng.integers(len(photos.images)))
            photo = photos.images[k]
            h, w = photo.shape[:2]
            aspect = float(rng.uniform(0.6, 1.8))  # width / height of the crop, as web images vary
            crop_h = int(rng.uniform(0.3, 1.0) * min(h, w / aspect))
            crop_w = min(w, int(crop_h * aspect))
            top, left = int(rng.integers(h - crop_h + 1)), int(rng.integers(w - crop_w + 1))
            image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
            scale = 256 / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            name = f"{i:06d}.jpg"
            image.save(args.out / name, quality=95)
            rows.writerow([name, f"a photo of a {names[k]}, part {i}"])
    print(f"wrote {args.count} JPEGs (shorter side 256, quality 95) and captions.csv to {args.out}")


if __name__ == "__main__":
    main()
