"""The built-in dataset: captioned scenes of coloured shapes, rendered with Pillow, no download.

Each image shows one shape (circle, square, triangle, star, cross) in one colour (red, green, blue,
yellow, purple, orange), small or large, on the left, right, top, bottom or in the centre, on a
plain, noisy or striped grey background; its caption says so in varied words ("there is a small
blue square near the top"). A contrastive model has something real to learn: colour and shape
words, sizes and places, bound to pixels.

Zero-shot evaluation uses 16 classes, {red, green, blue, yellow} x {circle, square, triangle, star}
(chance 6.25%), rendered with a different seed. Four of them never appear in training: red star,
green triangle, blue square, yellow circle (each colour and each shape is held out once, so the
model has seen every word, just not these pairs). Their accuracy measures composition; the other
twelve measure recognition of seen pairs.

Layout written by `make_demo_dataset(out)`:
  out/train/{00000..}.tar          img2dataset layout: KEY.jpg, KEY.txt, KEY.json
  out/tokenizer.model              SentencePiece trained on the training captions
  out/eval/zero_shot/<class>/*.jpg ImageNet-style folder, classes like red_circle
  out/eval/classnames.txt          readable names in sorted folder order ("red circle")
  out/eval/templates.txt           prompt templates with {}
  out/eval/retrieval.jsonl         {"image": "retrieval/00000.jpg", "captions": [...]} per image
  out/demo.json                    the parameters; written last, so its presence means complete
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from webdataset import ShardWriter

from flip_ds.config_loader import UsageError
from flip_ds.data.tokenizer import train_tokenizer

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220), "yellow": (235, 205, 35),
           "purple": (135, 60, 180), "orange": (245, 135, 30)}
SHAPES = ("circle", "square", "triangle", "star", "cross")
ZERO_SHOT_COLOURS = ("red", "green", "blue", "yellow")
ZERO_SHOT_SHAPES = ("circle", "square", "triangle", "star")
HELD_OUT = (("red", "star"), ("green", "triangle"), ("blue", "square"), ("yellow", "circle"))
# Shape extent as a fraction of the image side. Even a small shape spans about three of the tiny
# model's 8-px patches at 64 px, so its outline survives 50% masking: with smaller shapes a tiny
# model learns the colours quickly but barely the shapes.
SIZES = {"small": (0.3, 0.4), "large": (0.55, 0.7)}
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("plain", "noisy", "striped")

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
PLACE_WORDS = {"left": ("on the left", "at the left side", "to the left"),
               "right": ("on the right", "at the right side", "to the right"),
               "top": ("near the top", "at the top"), "bottom": ("near the bottom", "at the bottom"),
               "center": ("in the center", "in the middle")}
CAPTIONS = (
    "a {size} {colour} {shape} {place}",
    "there is a {size} {colour} {shape} {place}",
    "a {colour} {shape} {place}",
    "{size} {colour} {shape}",
    "a picture of a {colour} {shape}",
    "the {colour} {shape} is {place}",
    "a {size} {colour} {shape} on a {background} background",
    "{colour} {shape}",
    "an image showing a {size} {shape} in {colour}",
    "a {shape} coloured {colour}, {place}",
)
TEMPLATES = ("a {}.", "a picture of a {}.", "there is a {}.", "a small {}.", "a large {}.", "a {} in the middle.")
SUPERSAMPLE = 4  # shapes are drawn this many times larger, then downscaled: smooth edges
TRAIN, ZERO_SHOT, RETRIEVAL = 1, 2, 3  # seed streams of the three splits


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    background: str

    def caption(self, rng: np.random.Generator) -> str:
        words = {"colour": self.colour, "shape": self.shape, "background": self.background,
                 "size": _pick(rng, SIZE_WORDS[self.size]), "place": _pick(rng, PLACE_WORDS[self.position])}
        return re.sub(r"\ba (?=[aeiou])", "an ", _pick(rng, CAPTIONS).format(**words))


@dataclass(frozen=True)
class DemoData:
    """Paths of a built-in dataset, ready for a recipe's data and eval sections."""

    root: str
    train: str  # brace spec of the training shards
    tokenizer: str
    zero_shot: str  # ImageNet-style folder
    classnames: str
    templates: str
    retrieval: str  # JSONL, several captions per image
    train_samples: int


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def train_pairs() -> list[tuple[str, str]]:
    """Every (colour, shape) the training split shows: all but the held-out pairs."""
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]


def zero_shot_classes() -> list[tuple[str, str]]:
    return [(c, s) for c in ZERO_SHOT_COLOURS for s in ZERO_SHOT_SHAPES]


def random_scene(rng: np.random.Generator, pairs: list[tuple[str, str]]) -> Scene:
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    return Scene(colour, shape, _pick(rng, tuple(SIZES)), _pick(rng, POSITIONS), _pick(rng, BACKGROUNDS))


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(math.pi / 4 + k * math.pi / 2) for k in range(4)]
        return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for a in corners]
    if shape == "triangle":
        return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.42 * r) * math.cos(-math.pi / 2 + k * math.pi / 5 + angle),
                 cy + (r if k % 2 == 0 else 0.42 * r) * math.sin(-math.pi / 2 + k * math.pi / 5 + angle))
                for k in range(10)]
    if shape == "cross":
        w = 0.36 * r
        outline = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w),
                   (-w, w), (-w, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in outline]
    raise ValueError(f"unknown shape {shape}")


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """The scene as an RGB image, colour, size, place, rotation and background jittered by `rng`."""
    big = image_size * SUPERSAMPLE
    level = int(rng.integers(60, 230))
    if scene.background == "plain":
        canvas = np.full((big, big, 3), level, dtype=np.uint8)
    elif scene.background == "noisy":
        noise = rng.normal(level, 25, size=(image_size, image_size, 1)).clip(0, 255).astype(np.uint8)
        canvas = np.repeat(np.repeat(np.repeat(noise, SUPERSAMPLE, 0), SUPERSAMPLE, 1), 3, 2)
    else:
        period = int(rng.integers(3, 7)) * SUPERSAMPLE
        stripes = (np.arange(big) // period) % 2 == 0
        canvas = np.where(stripes[:, None, None], level, max(level - 45, 0)).astype(np.uint8)
        canvas = np.broadcast_to(canvas, (big, big, 3)).copy()
        if rng.integers(2):
            canvas = canvas.transpose(1, 0, 2).copy()
    image = Image.fromarray(canvas)
    extent = rng.uniform(*SIZES[scene.size]) * big
    r = extent / 2
    margin = r + 0.04 * big
    near, far, mid = margin, big - margin, big / 2
    jitter = rng.uniform(-0.05, 0.05, size=2) * big
    cx, cy = {"left": (near, mid), "right": (far, mid), "top": (mid, near), "bottom": (mid, far),
              "center": (mid, mid)}[scene.position]
    cx, cy = float(np.clip(cx + jitter[0], margin, far)), float(np.clip(cy + jitter[1], margin, far))
    colour = tuple(int(v) for v in np.clip(np.array(COLOURS[scene.colour]) + rng.integers(-18, 19, size=3), 0, 255))
    draw = ImageDraw.Draw(image)
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon(_shape_points(scene.shape, cx, cy, r, float(rng.uniform(-0.3, 0.3))), fill=colour)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _train_sample(args: tuple[int, int, int, int]) -> dict:
    """Training sample i as a webdataset record; a pure function of its arguments."""
    i, per_shard, image_size, seed = args
    rng = np.random.default_rng([seed, TRAIN, i])
    scene = random_scene(rng, train_pairs())
    caption = scene.caption(rng)
    key = f"{i // per_shard:05d}{i % per_shard:0{len(str(per_shard - 1))}d}"  # img2dataset's keys
    meta = {"key": key, "caption": caption, "width": image_size, "height": image_size, **asdict(scene)}
    return {"__key__": key, "jpg": _jpeg(render(scene, image_size, rng)), "txt": caption.encode(),
            "json": json.dumps(meta).encode()}


def _write_train(root: Path, samples: int, per_shard: int, image_size: int, seed: int) -> list[str]:
    (root / "train").mkdir(parents=True, exist_ok=True)
    captions = []
    jobs = ((i, per_shard, image_size, seed) for i in range(samples))
    with (Pool(min(os.cpu_count() or 1, 4)) as pool,  # ordered results: the same shards for any pool size
          ShardWriter(str(root / "train" / "%05d.tar"), maxcount=per_shard, verbose=0, encoder=False, mtime=0) as out):
        for record in pool.imap(_train_sample, jobs, chunksize=64):
            out.write(record)
            captions.append(record["txt"].decode())
    return captions


def _write_eval(root: Path, per_class: int, retrieval_images: int, image_size: int, seed: int) -> None:
    folder = root / "eval" / "zero_shot"
    classes = sorted(zero_shot_classes(), key=lambda cs: f"{cs[0]}_{cs[1]}")
    for label, (colour, shape) in enumerate(classes):
        (folder / f"{colour}_{shape}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, ZERO_SHOT, label, i])
            scene = random_scene(rng, [(colour, shape)])
            render(scene, image_size, rng).save(folder / f"{colour}_{shape}" / f"{i:05d}.jpg", quality=90)
    (root / "eval" / "classnames.txt").write_text("".join(f"{c} {s}\n" for c, s in classes))
    (root / "eval" / "templates.txt").write_text("".join(f"{t}\n" for t in TEMPLATES))
    (root / "eval" / "retrieval").mkdir(parents=True, exist_ok=True)
    all_pairs = [(c, s) for c in COLOURS for s in SHAPES]
    with open(root / "eval" / "retrieval.jsonl", "w") as f:
        for i in range(retrieval_images):
            rng = np.random.default_rng([seed, RETRIEVAL, i])
            scene = random_scene(rng, all_pairs)
            name = f"retrieval/{i:05d}.jpg"
            render(scene, image_size, rng).save(root / "eval" / name, quality=90)
            f.write(json.dumps({"image": name, "captions": [scene.caption(rng) for _ in range(3)]}) + "\n")


def make_demo_dataset(out: str, train_samples: int = 6000, eval_per_class: int = 25, image_size: int = 64,
                      samples_per_shard: int = 1000, retrieval_images: int = 200, vocab_size: int = 256,
                      seed: int = 0) -> DemoData:
    """Write the built-in dataset under `out` (see the module doc); a complete one with the same
    parameters is left as it is, one with other parameters is an error."""
    if train_samples < 1 or eval_per_class < 1 or samples_per_shard < 1 or retrieval_images < 1:
        raise UsageError("demo data: sample counts must be >= 1")
    if image_size < 16:
        raise UsageError(f"demo data: image size {image_size} is below 16 pixels")
    root = Path(out)
    params = {"train_samples": train_samples, "eval_per_class": eval_per_class, "image_size": image_size,
              "samples_per_shard": samples_per_shard, "retrieval_images": retrieval_images,
              "vocab_size": vocab_size, "seed": seed}
    manifest = root / "demo.json"
    shards = -(-train_samples // samples_per_shard)
    data = DemoData(root=str(root), train=str(root / "train" / f"{{00000..{shards - 1:05d}}}.tar"),
                    tokenizer=str(root / "tokenizer.model"), zero_shot=str(root / "eval" / "zero_shot"),
                    classnames=str(root / "eval" / "classnames.txt"), templates=str(root / "eval" / "templates.txt"),
                    retrieval=str(root / "eval" / "retrieval.jsonl"), train_samples=train_samples)
    if manifest.is_file():
        if json.loads(manifest.read_text()) != params:
            raise UsageError(f"demo data: '{out}' holds a demo dataset made with other parameters "
                              f"({manifest.read_text().strip()}); choose another directory or delete it")
        return data
    captions = _write_train(root, train_samples, samples_per_shard, image_size, seed)
    _write_eval(root, eval_per_class, retrieval_images, image_size, seed)
    train_tokenizer(captions, str(root / "tokenizer"), vocab_size=vocab_size)
    manifest.write_text(json.dumps(params))
    return data
