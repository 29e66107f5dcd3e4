"""The data tools through the real CLI: make-shards, train-tokenizer, demo-data, bench-data."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flip_ds.cli import main
from flip_ds.config import load_recipe
from flip_ds.config_loader import UsageError
from flip_ds.cost import Setting
from flip_ds.data.make_shards import read_captions, write_shards
from flip_ds.data.reader import ShardReader
from flip_ds.data.synthetic import HELD_OUT, make_demo_dataset
from flip_ds.data.tokenizer import Tokenizer
from flip_ds.evaluation.datasets import ImageDataset, read_retrieval_set
from flip_ds.plan import Cluster, plan
from tests.distributed_helpers import REPO


def read_shard(shard: Path) -> list[dict]:
    reader = ShardReader(str(shard))
    samples = list(reader)
    assert reader.fault is None
    return samples


def read_back(out: Path) -> list[dict]:
    return [sample for shard in sorted(out.glob("*.tar")) for sample in read_shard(shard)]


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """Images of several kinds plus (path, caption) rows: 5 usable, 3 to skip."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name, size in [("a.jpg", (40, 30)), ("big.jpg", (300, 200)), ("sub/c.jpg", (64, 64))]:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name, quality=90)
    Image.fromarray(rng.integers(0, 256, (20, 50, 4), dtype=np.uint8)).save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "grey.webp")
    (folder / "broken.jpg").write_bytes((folder / "a.jpg").read_bytes()[:200])
    rows = [("a.jpg", "a small picture, with a comma"), ("big.jpg", "café ☕ 日本語 \"quoted\""),
            ("missing.jpg", "no such file"), ("sub/c.jpg", "in a sub-folder"), ("alpha.png", "a png with alpha"),
            ("broken.jpg", "cut in half"), ("grey.webp", "grey webp"), ("a.jpg", "   ")]
    return folder, rows


def test_make_shards_reads_back_byte_exact(tmp_path, image_folder, capsys):
    folder, rows = image_folder
    with open(tmp_path / "captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("path", "caption"), *rows])
    args = ["make-shards", "--images", str(folder), "--captions", str(tmp_path / "captions.csv"), "--out",
            str(tmp_path / "out"), "--samples-per-shard", "2", "--max-side", "128", "--workers", "2", "--no-progress",
            "--no-shuffle"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "wrote 5 samples in 3 shard(s)" in summary and "in input order" in summary
    assert "missing_file 1, corrupt_image 1, empty_caption 1" in summary
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]

    samples = read_back(tmp_path / "out")
    usable = [0, 1, 3, 4, 6]
    assert [s["__key__"] for s in samples] == ["000000", "000001", "000010", "000011", "000020"]
    assert [s["txt"] for s in samples] == [rows[i][1].encode() for i in usable]
    sizes = [Image.open(io.BytesIO(s["jpg"])).size for s in samples]
    assert sizes == [(40, 30), (128, 85), (64, 64), (50, 20), (16, 16)]
    assert all(Image.open(io.BytesIO(s["jpg"])).format == "JPEG" for s in samples)
    assert samples[0]["jpg"] == (folder / "a.jpg").read_bytes()  # a JPEG needing no resize is kept as is
    meta = [json.loads(s["json"]) for s in samples]
    assert [m["source"] for m in meta] == [rows[i][0] for i in usable]
    assert meta[1] == {"key": "000001", "caption": rows[1][1], "source": "big.jpg", "width": 128, "height": 85,
                       "original_width": 300, "original_height": 200, "status": "success"}

    # The same input in another format gives the same bytes.
    with open(tmp_path / "captions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"image": p, "text": c}) + "\n" for p, c in rows)
    args[4], args[6] = str(tmp_path / "captions.jsonl"), str(tmp_path / "again")
    assert main(args + ["--workers", "1"]) == 0
    digest = [hashlib.md5(p.read_bytes()).hexdigest() for p in sorted((tmp_path / "out").glob("*.tar"))]
    assert digest == [hashlib.md5(p.read_bytes()).hexdigest() for p in sorted((tmp_path / "again").glob("*.tar"))]


def test_make_shards_from_parquet(tmp_path, image_folder):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder, rows = image_folder
    pq.write_table(pa.table({"file": [r[0] for r in rows[:2]], "caption": [r[1] for r in rows[:2]]}),
                   tmp_path / "c.parquet")
    assert main(["make-shards", "--images", str(folder), "--captions", str(tmp_path / "c.parquet"), "--out",
                 str(tmp_path / "out"), "--no-progress", "--workers", "1"]) == 0
    assert [s["txt"].decode() for s in read_back(tmp_path / "out")] == [rows[0][1], rows[1][1]]


def shard_classes(out: Path) -> list[list[str]]:
    """The class folder of each sample, shard by shard, in the order written."""
    return [[json.loads(s["json"])["source"].split("/")[0] for s in read_shard(shard)]
            for shard in sorted(out.glob("*.tar"))]


def test_make_shards_from_class_folders(tmp_path, capsys):
    rng = np.random.default_rng(1)
    classes = ("golden_retriever", "tabby_cat", "zebra")
    for cls in classes:
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "tree" / cls / f"{i}.png")
    (tmp_path / "t.txt").write_text("a photo of a {}.\na drawing of a {}.\n")

    def make(out: str, *options: str) -> list[list[str]]:
        assert main(["make-shards", "--class-folders", str(tmp_path / "tree"), "--templates", str(tmp_path / "t.txt"),
                     "--out", str(tmp_path / out), "--samples-per-shard", "4", "--no-progress", "--workers", "1",
                     *options]) == 0
        return shard_classes(tmp_path / out)

    # In the folders' order, each shard of 4 would be one class: what the training stream could not mix
    assert make("ordered", "--no-shuffle") == [[c] * 4 for c in classes]
    assert "in input order" in capsys.readouterr().out
    samples = read_back(tmp_path / "ordered")
    captions = [s["txt"].decode() for s in samples]
    assert len(captions) == 12 and all(c.endswith(("golden retriever.", "tabby cat.", "zebra.")) for c in captions)
    assert {c.split(" of a ")[0] for c in captions} == {"a photo", "a drawing"}
    sources = [json.loads(s["json"])["source"] for s in samples]
    assert sources[:2] == ["golden_retriever/0.png", "golden_retriever/1.png"]

    # By default the samples are shuffled across shards: no shard is one class, and a new seed is a new order
    shuffled = make("shuffled")
    assert "shuffled with seed 0" in capsys.readouterr().out
    assert sorted(sum(shuffled, [])) == sorted(sum(make("ordered_again", "--no-shuffle"), []))
    assert all(len(set(shard)) > 1 for shard in shuffled), shuffled
    assert make("reseeded", "--seed", "1") != shuffled
    # ... deterministically: the same seed gives the same bytes
    make("shuffled_again", "--seed", "0")
    for shard in sorted((tmp_path / "shuffled").glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "shuffled_again" / shard.name).read_bytes()


def test_make_shards_refuses_bad_input(tmp_path, capsys):
    (tmp_path / "c.csv").write_text("filename,label\nx.jpg,y\n")
    assert main(["make-shards", "--captions", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "needs a path column" in capsys.readouterr().err
    with pytest.raises(UsageError, match="no column 'url'"):
        read_captions(str(tmp_path / "c.csv"), ".", path_column="url")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "00000.tar").write_bytes(b"")
    with pytest.raises(UsageError, match="already holds shards"):
        write_shards([], str(tmp_path / "o"))


def test_one_captions_file_feeds_make_shards_and_eval_retrieval(tmp_path, image_folder, capsys):
    """make-shards and eval retrieval read captions files with one reader: a `path` column works for both,
    the shards make-shards writes from it are the same retrieval set, and a file neither can use gets the
    same one-line error from both."""
    folder, _ = image_folder
    rows = [("a.jpg", "a small picture"), ("big.jpg", "a big one"), ("sub/c.jpg", "in a sub-folder"),
            ("a.jpg", "the small picture again")]
    with open(tmp_path / "captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("path", "caption"), *rows])
    assert main(["make-shards", "--images", str(folder), "--captions", str(tmp_path / "captions.csv"), "--out",
                 str(tmp_path / "out"), "--no-shuffle", "--workers", "1", "--no-progress"]) == 0
    assert "wrote 4 samples in 1 shard(s)" in capsys.readouterr().out

    from_file = read_retrieval_set(str(tmp_path / "captions.csv"), image_root=str(folder))
    assert from_file.images == [str(folder / p) for p in ("a.jpg", "big.jpg", "sub/c.jpg")]
    assert from_file.captions == [c for _, c in rows] and from_file.caption_image == [0, 1, 2, 0]
    from_shards = read_retrieval_set(str(tmp_path / "out" / "*.tar"))
    assert from_shards.captions == [c for _, c in rows] and from_shards.caption_image == [0, 1, 2, 3]
    file_images, shard_images = ImageDataset(from_file.images, 24), ImageDataset(from_shards.images, 24)
    for i, image in enumerate([0, 1, 2, 0]):  # JPEGs kept byte for byte, so the same tensors
        assert torch.equal(shard_images[i][0], file_images[image][0]) and shard_images[i][1]

    # A caption cell may hold a list: one sample per caption for make-shards, one image with them for eval
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"image": "a.jpg", "captions": [rows[0][1], rows[3][1]]}) + "\n"
        + json.dumps({"image": "big.jpg", "captions": rows[1][1]}) + "\n")
    pairs = read_captions(str(tmp_path / "captions.jsonl"), str(folder))
    assert [(p.path, p.caption) for p in pairs] == [rows[0], rows[3], rows[1]]
    again = read_retrieval_set(str(tmp_path / "captions.jsonl"), image_root=str(folder))
    assert again.images == from_file.images[:2] and again.caption_image == [0, 0, 1]

    bad = tmp_path / "bad.csv"
    bad.write_text("filename,label\nx.jpg,y\n")
    expected = (f"flip-ds: error: captions file '{bad}' needs a path column (one of path, image, filepath, file); "
                "it has ['filename', 'label']\n")
    assert main(["make-shards", "--captions", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == expected
    assert main(["eval", "retrieval", str(tmp_path / "no_model"), "--data", str(bad)]) == 2
    assert capsys.readouterr().err == expected


def test_train_tokenizer_from_shards_and_text(demo_shards, tmp_path, capsys):
    assert main(["train-tokenizer", "--shards", demo_shards.train, "--out", str(tmp_path / "tok"),
                 "--vocab-size", "200"]) == 0
    assert "from 512 captions; skipped: nothing" in capsys.readouterr().out
    tok = Tokenizer(str(tmp_path / "tok.model"), context_length=12)
    assert 50 < tok.vocab_size <= 200
    ids = tok("a small red circle on the left")
    assert ids[0] == 2 and 3 in ids and 1 not in ids  # BOS, EOS, no unknown pieces
    (tmp_path / "captions.txt").write_text("a cat\na dog on a mat\n" * 50)
    assert main(["train-tokenizer", "--captions", str(tmp_path / "captions.txt"), "--out", str(tmp_path / "t2"),
                 "--vocab-size", "20"]) == 0
    assert Tokenizer(str(tmp_path / "t2.model"), 8).vocab_size <= 20


def test_train_tokenizer_says_in_one_line_which_vocab_size_would_work(tmp_path, capsys):
    """A vocabulary smaller than the captions' characters: exit 2, one line naming the smallest size that
    trains, and that size does train while one less does not."""
    text = "the quick brown fox jumps over the lazy dog\nsphinx of black quartz, judge my vow!\n"
    (tmp_path / "captions.txt").write_text(text * 20)
    characters = len(set(text.replace("\n", "")))  # 26 letters, space, ',' and '!' (lower-cased already)

    def train(vocab: int) -> tuple[int, str]:
        status = main(["train-tokenizer", "--captions", str(tmp_path / "captions.txt"), "--out",
                       str(tmp_path / f"tok{vocab}"), "--vocab-size", str(vocab)])
        return status, capsys.readouterr().err

    status, err = train(16)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("flip-ds: error: train-tokenizer: vocab size 16 is too small")
    assert f"their {characters} distinct characters" in err
    assert f"use a vocab size of at least {characters + 4}" in err  # + pad, unk, bos, eos
    assert train(characters + 3)[0] == 2
    assert train(characters + 4) == (0, "")
    assert Tokenizer(str(tmp_path / f"tok{characters + 4}.model"), 8).vocab_size == characters + 4

    status, err = train(4)  # not even the special pieces fit
    assert status == 2 and err.strip() == ("flip-ds: error: train-tokenizer: vocab size 4 leaves no room for text: it "
                                           "must exceed the 4 special pieces (pad, unk, bos, eos) plus the captions' "
                                           "characters")
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert main(["train-tokenizer", "--captions", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t")]) == 2
    assert "no captions to train on" in capsys.readouterr().err


def test_demo_data_layout_is_complete_and_holds_out_pairs(demo_shards):
    root = Path(demo_shards.root)
    classes = sorted(p.name for p in Path(demo_shards.zero_shot).iterdir())
    assert len(classes) == 16 and all(len(list((Path(demo_shards.zero_shot) / c).glob("*.jpg"))) == 4
                                      for c in classes)
    names = Path(demo_shards.classnames).read_text().splitlines()
    assert names == [c.replace("_", " ") for c in classes]
    assert all(t.count("{}") == 1 for t in Path(demo_shards.templates).read_text().splitlines())
    records = [json.loads(line) for line in Path(demo_shards.retrieval).read_text().splitlines()]
    assert len(records) == 16 and all(len(r["captions"]) == 3 and (root / "eval" / r["image"]).is_file()
                                      for r in records)
    samples = read_back(root / "train")
    pairs = {(json.loads(s["json"])["colour"], json.loads(s["json"])["shape"]) for s in samples}
    assert not pairs & set(HELD_OUT) and len(pairs) == 26
    assert all(Image.open(io.BytesIO(s["jpg"])).size == (64, 64) for s in samples[:5])


def test_demo_data_is_deterministic_and_idempotent(tmp_path, capsys):
    small = dict(train_samples=24, samples_per_shard=10, eval_per_class=1, retrieval_images=2, image_size=32,
                 vocab_size=60)
    a = make_demo_dataset(str(tmp_path / "a"), **small)
    assert main(["demo-data", "--out", str(tmp_path / "b"), "--train-samples", "24", "--samples-per-shard", "10",
                 "--eval-per-class", "1", "--retrieval-images", "2", "--image-size", "32", "--vocab-size", "60"]) == 0
    assert "{00000..00002}.tar (24 samples)" in capsys.readouterr().out
    for name in ("train/00000.tar", "train/00002.tar", "eval/zero_shot/red_star/00000.jpg", "eval/retrieval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    stamp = (tmp_path / "a" / "train" / "00000.tar").stat().st_mtime_ns
    assert make_demo_dataset(str(tmp_path / "a"), **small) == a
    assert (tmp_path / "a" / "train" / "00000.tar").stat().st_mtime_ns == stamp  # complete: left as it is
    with pytest.raises(UsageError, match="other parameters"):
        make_demo_dataset(str(tmp_path / "a"), **{**small, "seed": 1})


def test_bench_data_reports_rates(demo_shards, capsys):
    assert main(["bench-data", "--shards", demo_shards.train, "--tokenizer", demo_shards.tokenizer, "--workers", "2",
                 "--batch-size", "16", "--seconds", "1", "--image-size", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["per_worker_samples_per_s"]) == {"0", "1"} and report["skipped"] == {}
    # whole batches of 16 over the measured seconds (rounded to 0.01 s), shared out among the workers
    assert report["samples"] % 16 == 0 and report["samples"] >= 2 * 16
    assert report["samples_per_s"] == pytest.approx(report["samples"] / report["seconds"], rel=0.02)
    assert sum(report["per_worker_samples_per_s"].values()) == pytest.approx(report["samples_per_s"])
    # each loader worker decodes about as fast as the one reader timed alone, also on one core
    # (measured 0.55-0.95x): a rate in batches, or per millisecond, is 16x or 1000x away
    single = report["single_worker_samples_per_s"]
    assert all(single / 8 < rate < single * 8 for rate in report["per_worker_samples_per_s"].values()), report


def test_bench_data_says_how_many_cores_feed_a_recipes_gpus(demo_shards, capsys):
    recipe = str(REPO / "configs" / "flip_h14_laion2b_25.6b.yaml")
    assert main(["bench-data", "--shards", demo_shards.train, "--tokenizer", demo_shards.tokenizer, "--workers", "1",
                 "--batch-size", "16", "--seconds", "1", "--image-size", "32", "--recipe", recipe, "--gpus", "256",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    feeding = report["feeding"]
    masked = plan(load_recipe(recipe), Cluster(gpus=256, gpu_mem_gib=80), Setting(), 32000).clock.phases[0]
    per_gpu = masked.steps * 65536 / (masked.hours[1] * 3600) / 256  # the masked phase at the planner's fast end
    assert feeding["phase"] == "masked" and feeding["samples_per_s_per_gpu"] == pytest.approx(per_gpu)
    cores = per_gpu / report["single_worker_samples_per_cpu_s"]
    assert feeding["loader_cores_per_gpu"] == pytest.approx(cores)
    assert feeding["cpus_per_task"] == math.ceil(cores) + 1
    assert main(["bench-data", "--shards", demo_shards.train, "--tokenizer", demo_shards.tokenizer,
                 "--recipe", recipe]) == 2
    assert "--recipe and --gpus go together" in capsys.readouterr().err
