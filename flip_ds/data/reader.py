"""Reading one tar shard with webdataset, and splitting a sample into image bytes and caption.

webdataset's tar iterators do the reading; this module adds what a long run needs from them: every
failure becomes a counted cause (faults.py) instead of an exception or a silent stop. Python's
streaming tarfile ends quietly at a truncated header, so the end of every uncompressed shard is
checked too: a tar must end with its zero end-of-archive blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from flip_ds.data.faults import shard_fault

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode formats, in order of preference
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: their decoders detect truncation
_END_OF_ARCHIVE = 1024  # two zero 512-byte blocks


class Skip(Exception):
    """This sample cannot be used; `cause` is one of faults.SAMPLE_CAUSES. Not an error: it is counted
    and the run goes on."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


@dataclass
class Sample:
    key: str
    url: str
    image: bytes
    caption: str


def parse_sample(raw: dict[str, Any]) -> Sample:
    """Image bytes and the UTF-8 caption of a webdataset sample; raises Skip naming what is wrong."""
    return Sample(raw["__key__"], raw["__url__"], parse_image(raw), parse_caption(raw))


def parse_image(raw: dict[str, Any]) -> bytes:
    """The encoded image of a webdataset sample, by IMAGE_KEYS' preference; raises Skip('missing_image')."""
    image = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
    if image is None:
        raise Skip("missing_image")
    return image


def parse_caption(raw: dict[str, Any]) -> str:
    """The stripped UTF-8 caption of a webdataset sample; raises Skip naming what is wrong."""
    if "txt" not in raw:
        raise Skip("missing_caption")
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Skip("non_utf8_caption") from None
    if not caption:
        raise Skip("empty_caption")
    return caption


class _EndWatch:
    """A read-only stream that remembers how it ended: total size and where the last non-zero byte was."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.size = 0
        self.last_data = -1  # offset of the last non-zero byte seen
        self.head = b""
        self.reached_eof = False

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if not data:
            self.reached_eof = True
        if len(self.head) < 8:
            self.head += data[: 8 - len(self.head)]
        stripped = len(data.rstrip(b"\0"))
        if stripped:
            self.last_data = self.size + stripped - 1
        self.size += len(data)
        return data

    def end_fault(self) -> str | None:
        """After the tar reader stopped: truncated_tar if the archive has no end marker, corrupt_tar if the
        reader stopped before the data did (a bad header mid-archive ends Python's tarfile silently)."""
        if self.head.startswith(_COMPRESSED_MAGIC):
            return None
        stopped_at = self.size
        while self.read(1 << 16):
            pass
        if self.size % 512 or self.size - self.last_data - 1 < _END_OF_ARCHIVE:
            return "truncated_tar"
        return "corrupt_tar" if self.last_data >= stopped_at else None

    def close(self) -> None:
        self.stream.close()


class ShardReader:
    """The raw samples of one shard in tar order. Once exhausted, `fault` holds the shard's fault cause
    (None when it read cleanly, 'empty_shard' when it held no sample); the samples before a fault are
    good to use."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fault: str | None = None
        self._samples = self._read()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._samples

    def __next__(self) -> dict[str, Any]:
        return next(self._samples)

    def _stop(self, exn: Exception) -> bool:
        """webdataset's error handler: note the first fault and stop reading this shard."""
        if self.fault is None:
            self.fault = shard_fault(exn)
        return False

    def _read(self) -> Iterator[dict[str, Any]]:
        try:
            stream = _EndWatch(gopen(self.url, "rb"))
        except Exception as exn:  # any failure to open (missing, unreadable, a failing pipe:) is a shard fault
            self._stop(exn)
            return
        try:
            files = tar_file_expander([{"url": self.url, "stream": stream}], handler=self._stop)
            empty = True
            for sample in group_by_keys(files, handler=self._stop):
                empty = False
                yield sample
            if self.fault is None:
                self.fault = stream.end_fault() or ("empty_shard" if empty else None)
        except OSError as exn:  # an I/O error while checking the end
            self._stop(exn)
        finally:
            try:
                stream.close()
            except Exception as exn:  # a pipe: url's command failed (webdataset checks its status on close)
                self._stop(exn)
