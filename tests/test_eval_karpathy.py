"""Flickr30k / COCO as users have them: Karpathy-split JSON (dataset_flickr30k.json, dataset_coco.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flip_ds.cli import main
from flip_ds.config_loader import ConfigError, UsageError
from flip_ds.evaluation import retrieval
from flip_ds.evaluation.config import EvalSet
from flip_ds.evaluation.datasets import ImageDataset, read_retrieval_set
from flip_ds.evaluation.runner import check_sets


def write_image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 16, 3), shade, dtype=np.uint8)).save(path)


def sentences(image: str, n: int = 5) -> list[dict]:
    """Karpathy's sentence records: raw text plus the tokens, ids and image id the real files carry."""
    return [{"raw": f"{image} caption {c}.", "tokens": [image, "caption", str(c)], "imgid": 0, "sentid": c}
            for c in range(n)]


# (filename, split, sentences); Flickr30k's layout: every image in one folder, no "filepath"
FLICKR = [("1000092795.jpg", "train", 5), ("10002456.jpg", "test", 5), ("1000268201.jpg", "val", 5),
          ("1000344755.jpg", "test", 5), ("1000366164.jpg", "test", 5)]
# COCO's: "filepath" names the folder; a few COCO images have more than 5 sentences
COCO = [("val2014", "COCO_val2014_000000391895.jpg", "test", 7), ("train2014", "COCO_train2014_000000057870.jpg",
         "train", 5), ("val2014", "COCO_val2014_000000522418.jpg", "restval", 5),
        ("val2014", "COCO_val2014_000000184613.jpg", "test", 6), ("val2014", "COCO_val2014_000000318219.jpg",
         "val", 5)]


def write_karpathy(path: Path, dataset: str, entries: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": entries, "dataset": dataset}))
    return path


@pytest.fixture()
def flickr(tmp_path: Path) -> tuple[Path, Path]:
    """(dataset_flickr30k.json, image root): the JSON apart from the images, as Karpathy ships it."""
    for i, (name, _, _) in enumerate(FLICKR):
        write_image(tmp_path / "flickr30k-images" / name, 40 * i)
    entries = [{"filename": n, "imgid": i, "split": s, "sentids": list(range(k)), "sentences": sentences(n, k)}
               for i, (n, s, k) in enumerate(FLICKR)]
    return write_karpathy(tmp_path / "caption_datasets" / "dataset_flickr30k.json", "flickr30k", entries), \
        tmp_path / "flickr30k-images"


@pytest.fixture()
def coco(tmp_path: Path) -> tuple[Path, Path]:
    for i, (folder, name, _, _) in enumerate(COCO):
        write_image(tmp_path / "coco" / folder / name, 40 * i)
    entries = [{"filepath": f, "filename": n, "imgid": i, "split": s, "cocoid": i, "sentences": sentences(n, k)}
               for i, (f, n, s, k) in enumerate(COCO)]
    return write_karpathy(tmp_path / "dataset_coco.json", "coco", entries), tmp_path / "coco"


def test_flickr30k_test_split_five_captions_each(flickr):
    ann, root = flickr
    data = read_retrieval_set(str(ann), image_root=str(root))
    test = [n for n, s, _ in FLICKR if s == "test"]
    assert data.images == [str(root / n) for n in test]
    assert data.captions == [f"{n} caption {c}." for n in test for c in range(5)]
    assert data.caption_image == [i for i in range(3) for _ in range(5)]
    assert data.split == "test" and data.sources == [str(ann)]
    ds = ImageDataset(data.images, 16)
    assert all(ds[i][1] for i in range(len(ds)))  # every resolved path is a readable image

    val = read_retrieval_set(str(ann), image_root=str(root), split="val")
    assert val.images == [str(root / "1000268201.jpg")] and len(val.captions) == 5 and val.split == "val"


def test_coco_paths_join_filepath_and_at_most_five_captions(coco, tmp_path):
    ann, root = coco
    data = read_retrieval_set(str(ann), image_root=str(root))
    assert data.images == [str(root / "val2014" / "COCO_val2014_000000391895.jpg"),
                           str(root / "val2014" / "COCO_val2014_000000184613.jpg")]
    assert data.caption_image == [0] * 5 + [1] * 5  # 7 and 6 sentences: the first 5 of each
    assert data.captions[:5] == [f"COCO_val2014_000000391895.jpg caption {c}." for c in range(5)]
    restval = read_retrieval_set(str(ann), image_root=str(root), split="restval")
    assert restval.images == [str(root / "val2014" / "COCO_val2014_000000522418.jpg")]
    # without an image root, paths start at the JSON's folder
    (tmp_path / "val2014").symlink_to(root / "val2014")
    assert read_retrieval_set(str(ann)).images == [str(tmp_path / "val2014" / Path(p).name) for p in data.images]


def one_line_error(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_karpathy_errors_are_one_line(flickr, tmp_path):
    ann, root = flickr
    with pytest.raises(UsageError, match="image root '.*nowhere' of '.*' is not a directory") as e:
        read_retrieval_set(str(ann), image_root=str(tmp_path / "nowhere"))
    one_line_error(e)
    with pytest.raises(UsageError, match=r"none of the 3 images of split 'test' of '.*' is under image root "
                                         r"'.*caption_datasets' \(the first would be '.*10002456\.jpg'") as e:
        read_retrieval_set(str(ann))  # the default root, the JSON's folder, holds no image
    one_line_error(e)
    with pytest.raises(UsageError, match="captions file '.*dataset_coco.json' does not exist"):
        read_retrieval_set(str(tmp_path / "dataset_coco.json"), image_root=str(root), split="test")
    no_test = write_karpathy(tmp_path / "no_test.json", "flickr30k",
                             [{"filename": n, "split": s, "sentences": sentences(n)} for n, s, _ in FLICKR
                              if s != "test"])
    with pytest.raises(UsageError, match=r"has no image in split 'test' \(splits present: train, val\)") as e:
        read_retrieval_set(str(no_test), image_root=str(root))
    one_line_error(e)
    no_raw = write_karpathy(tmp_path / "no_raw.json", "flickr30k",
                            [{"filename": "10002456.jpg", "split": "test", "sentences": [{"tokens": ["a"]}]}])
    with pytest.raises(UsageError, match="image '10002456.jpg': sentences must be a list of objects with a 'raw'"):
        read_retrieval_set(str(no_raw), image_root=str(root))
    blip = tmp_path / "flickr30k_test.json"  # a list of records: BLIP's format, which has no splits
    blip.write_text(json.dumps([{"image": "10002456.jpg", "caption": ["a", "b"]}]))
    assert read_retrieval_set(str(blip), image_root=str(root)).split == ""
    with pytest.raises(UsageError, match="split 'val' applies only to a Karpathy-split JSON"):
        read_retrieval_set(str(blip), image_root=str(root), split="val")


def test_karpathy_eval_set_in_a_recipe_and_on_the_command_line(flickr, tmp_path, capsys):
    ann, root = flickr
    check_sets([EvalSet(name="flickr30k", kind="retrieval", path=str(ann), image_root=str(root))])
    with pytest.raises(UsageError, match="has no image in split 'restval'"):
        check_sets([EvalSet(name="flickr30k", kind="retrieval", path=str(ann), image_root=str(root),
                            split="restval")])
    with pytest.raises(ConfigError, match="eval_set.split: 'tset' is not one of test, val, train, restval"):
        EvalSet(name="f", kind="retrieval", path=str(ann), split="tset").validate()
    # the data is read before any model is loaded, so a wrong root costs no checkpoint read
    code = main(["eval", "retrieval", str(tmp_path / "model.safetensors"), "--data", str(ann), "--split", "val",
                 "--image-root", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not a directory" in err


def test_image_to_text_counts_any_of_the_five_captions(flickr):
    """Each test image's only near caption is its 3rd; the other four point nowhere (score 0 with every
    image). Image-to-text R@1 is then 1 only if any caption counts, and 0 if only the first did."""
    ann, root = flickr
    data = read_retrieval_set(str(ann), image_root=str(root))
    owner = torch.tensor(data.caption_image)
    slot = torch.tensor([c % 5 for c in range(len(owner))])  # 5 captions an image, in file order
    assert torch.equal(owner, torch.arange(3).repeat_interleave(5))
    images = torch.eye(4)[:3]  # image i is e_i; e_3 is the direction of no image
    texts = torch.where((slot == 2)[:, None], torch.eye(4)[owner], torch.eye(4)[3])
    metrics = retrieval.score(images, texts, owner)
    assert metrics["i2t_r1"] == 1.0
    # text to image, each caption's one image: the 3 near captions at rank 0; a caption scoring 0 with
    # every image ranks its own image by index (ties: lower index first), so image 0's four at rank 0
    assert metrics["t2i_r1"] == pytest.approx(7 / 15) and metrics["t2i_r5"] == 1.0
