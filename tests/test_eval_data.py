"""Evaluation readers: shipped prompt lists, image folders with broken files, retrieval formats."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flip_ds.config_loader import UsageError
from flip_ds.data.reader import ShardReader, Skip, parse_sample
from flip_ds.data.transforms import decode_image
from flip_ds.evaluation.datasets import ImageDataset, eval_transform, read_image_folder, read_retrieval_set
from flip_ds.evaluation.prompts import load_classnames, load_templates


def write_image(path: Path, color: tuple[int, int, int], size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size + 6, 3), color, dtype=np.uint8)).save(path)


def test_shipped_prompt_lists():
    names = load_classnames("imagenet1k", [f"n{i:08d}" for i in range(1000)])
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert len(load_templates("clip80")) == 80
    short = load_templates("clip_short")
    assert short[0] == "itap of a {}." and len(short) == 7
    assert set(short) <= set(load_templates("clip80"))


def test_prompt_files_and_their_errors(tmp_path):
    (tmp_path / "t.txt").write_text("# my prompts\na photo of a {}.\n\n{} on a table\n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a photo of a {}.", "{} on a table"]
    (tmp_path / "bad.txt").write_text("a photo\n")
    with pytest.raises(UsageError, match="exactly one"):
        load_templates(str(tmp_path / "bad.txt"))
    with pytest.raises(UsageError, match="neither a file nor one of clip80, clip_short"):
        load_templates("clip81")
    (tmp_path / "names.txt").write_text("red thing\nblue thing\n")
    assert load_classnames(str(tmp_path / "names.txt"), ["a", "b"]) == ["red thing", "blue thing"]
    with pytest.raises(UsageError, match="has 2 names but the image folder has 3 classes"):
        load_classnames(str(tmp_path / "names.txt"), ["a", "b", "c"])
    assert load_classnames("", ["golden_retriever", "cat"]) == ["golden retriever", "cat"]


def test_image_folder_counts_unreadable_images(tmp_path):
    for c, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        for i in range(2):
            write_image(tmp_path / f"class_{c}" / f"{i}.png", color)
    (tmp_path / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "class_2" / "notes.txt").write_text("not an image extension: not listed")
    data = read_image_folder(str(tmp_path))
    assert data.classes == ["class_0", "class_1", "class_2"]
    assert len(data.images) == 7 and data.labels == [0, 0, 1, 1, 1, 2, 2]
    ds = ImageDataset(data.images, 16)
    items = [ds[i] for i in range(len(ds))]
    assert [ok for _, ok in items] == [True, True, True, True, False, True, True]  # class_1/broken.jpg
    image, _ = items[0]
    assert image.shape == (3, 16, 16)
    assert image[0].mean() > 1.5 and image[1].mean() < -1.5  # red after CLIP normalisation
    assert torch.count_nonzero(items[4][0]) == 0


def test_image_folder_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(UsageError, match="no images"):
        read_image_folder(str(tmp_path))


RECORDS = [("a.png", ["a red square", "something red"]), ("b.png", ["a green square"]),
           ("c.png", ["blue", "a blue square", "cobalt"])]


def expected_owner() -> list[int]:
    return [i for i, (_, caps) in enumerate(RECORDS) for _ in caps]


@pytest.fixture()
def retrieval_dir(tmp_path):
    for (name, _), color in zip(RECORDS, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        write_image(tmp_path / "img" / name, color)
    return tmp_path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv"])
def test_retrieval_annotation_formats(retrieval_dir, fmt):
    path = retrieval_dir / f"ann.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"image": f"img/{n}", "captions": c}) + "\n" for n, c in RECORDS))
    elif fmt == "json":  # BLIP / LAVIS Karpathy-split style: "caption" is a list
        path.write_text(json.dumps([{"image": f"img/{n}", "caption": c} for n, c in RECORDS]))
    else:
        with open(path, "w", newline="") as f:
            w = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
            w.writerow(["filepath", "title"] if fmt == "tsv" else ["image", "caption"])
            w.writerows([(f"img/{n}", c) for n, caps in RECORDS for c in caps])
    data = read_retrieval_set(str(path))
    assert data.captions == [c for _, caps in RECORDS for c in caps]
    assert data.caption_image == expected_owner()
    assert data.images == [str(retrieval_dir / "img" / n) for n, _ in RECORDS]


def test_retrieval_image_root(retrieval_dir, tmp_path_factory):
    ann = tmp_path_factory.mktemp("elsewhere") / "ann.jsonl"
    ann.write_text(json.dumps({"image": "a.png", "caption": "red"}) + "\n")
    data = read_retrieval_set(str(ann), image_root=str(retrieval_dir / "img"))
    assert data.images == [str(retrieval_dir / "img" / "a.png")] and data.captions == ["red"]


def test_retrieval_shards_with_txt_and_json_captions(retrieval_dir):
    def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    for shard, records in (("0.tar", RECORDS[:2]), ("1.tar", RECORDS[2:])):
        with tarfile.open(retrieval_dir / shard, "w") as tar:
            for i, (name, caps) in enumerate(records):
                key = f"{shard[0]}{i:04d}"
                add(tar, f"{key}.png", (retrieval_dir / "img" / name).read_bytes())
                if i % 2:
                    add(tar, f"{key}.json", json.dumps({"captions": caps}).encode())
                else:
                    add(tar, f"{key}.txt", "\n".join(caps).encode())
            add(tar, "orphan.txt", b"a caption without an image")
    data = read_retrieval_set(str(retrieval_dir / "{0..1}.tar"))
    assert data.captions == [c for _, caps in RECORDS for c in caps]
    assert data.caption_image == expected_owner()
    assert data.skipped_samples == 2
    assert [(Path(m.shard).name, m.key) for m in data.images] == [("0.tar", "00000"), ("0.tar", "00001"),
                                                                ("1.tar", "10000")]
    ds = ImageDataset(data.images, 16)
    assert all(ds[i][1] for i in range(3))
    assert ds[2][0][2].mean() > 1.5  # blue, read back from the second shard


def test_eval_reads_shards_as_training_does(faulty_shards):
    """A shard retrieval set is what the training reader makes of the shards: the same samples (keys), the
    same image bytes decoded to the same tensor, the same caption; samples training skips for a missing
    or bad member are left out, images training cannot decode are counted unreadable, and a shard that
    training would count as faulty makes the set unusable."""
    whole = faulty_shards.shards[:4]  # the fifth is truncated, the sixth absent
    trained = []
    for url in whole:
        for raw in ShardReader(url):
            try:
                trained.append(parse_sample(raw))
            except Skip:
                continue
    data = read_retrieval_set("::".join(whole))
    assert len(trained) == 154 and data.skipped_samples == 6  # 160 less 3 empty captions, 1 without .txt,
    # 1 non-UTF-8 .txt and 1 without an image
    assert [(m.shard, m.key) for m in data.images] == [(s.url, s.key) for s in trained]
    assert [m.data for m in data.images] == [s.image for s in trained]
    assert data.captions == [s.caption for s in trained]
    assert data.caption_image == list(range(154))

    ds, transform = ImageDataset(data.images, 32), eval_transform(32)
    unreadable = 0
    for i, sample in enumerate(trained):
        image, valid = ds[i]
        try:
            expected = transform(decode_image(sample.image))
        except Skip:
            assert not valid and torch.count_nonzero(image) == 0
            unreadable += 1
            continue
        assert valid and torch.equal(image, expected)
    assert unreadable == 9  # the corrupt JPEGs of the first four shards

    with pytest.raises(UsageError, match=r"retrieval shard '.*00004\.tar' cannot be read \(truncated_tar\)"):
        read_retrieval_set(faulty_shards.shards[4])
    with pytest.raises(UsageError, match=r"retrieval shard '.*00005\.tar' cannot be read \(missing_shard\)"):
        read_retrieval_set(faulty_shards.shards[5])


def test_retrieval_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_retrieval_set(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"}\n')
    with pytest.raises(UsageError, match=r"needs a caption column \(one of caption, captions, text, title\); "
                                          r"it has \['image'\]"):
        read_retrieval_set(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.json").write_text('["x.png"]')
    with pytest.raises(UsageError, match="record 0: not an object"):
        read_retrieval_set(str(tmp_path / "list.json"))
    (tmp_path / "bad.csv").write_text("filename,label\nx.png,hello\n")
    with pytest.raises(UsageError, match=r"needs a path column \(one of path, image, filepath, file\)"):
        read_retrieval_set(str(tmp_path / "bad.csv"))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(UsageError, match="cannot be read"):
        read_retrieval_set(str(tmp_path / "junk.tar"))


def test_check_sets_fails_at_start_up_on_a_bad_set(tmp_path):
    from flip_ds.evaluation.config import EvalSet
    from flip_ds.evaluation.runner import check_sets

    write_image(tmp_path / "zs" / "red" / "0.png", (255, 0, 0))
    good = EvalSet(name="zs", kind="zero_shot", path=str(tmp_path / "zs"), templates="clip_short")
    check_sets([good])
    with pytest.raises(UsageError, match="has 1000 names but the image folder has 1 classes"):
        check_sets([good, EvalSet(name="in1k", kind="zero_shot", path=str(tmp_path / "zs"), classnames="imagenet1k")])
    with pytest.raises(UsageError, match="does not exist"):
        check_sets([EvalSet(name="rt", kind="retrieval", path=str(tmp_path / "nope.jsonl"))])
