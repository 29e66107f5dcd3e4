"""Bad data, counted by cause: what a reader skipped, where, and when there is too much of it.

A training run never stops for one bad sample or shard; it skips it and counts it here. The cause
names are part of the public interface (they become the `data/<cause>` TensorBoard scalars):

shard causes, counted once per shard read (a resampled shard may be counted each time it is drawn):
  missing_shard     the file does not exist
  unreadable_shard  it exists but cannot be opened or read (permissions, a directory, an I/O error)
  truncated_tar     the archive ends early (cut mid-file, mid-header, or without its end marker);
                    the samples before the cut are used
  corrupt_tar       not a tar archive, a bad header, or a duplicated member name; the shard is left there
  empty_shard       a valid archive with no sample in it
sample causes, counted once per sample:
  missing_image     no .jpg/.jpeg/.png/.webp member (e.g. its files are not next to each other in the tar)
  missing_caption   no .txt member
  corrupt_image     the image bytes do not decode (corrupt or truncated JPEG, not an image at all)
  non_utf8_caption  the .txt is not UTF-8
  empty_caption     the .txt holds only white space
`samples_read` counts every sample read, good or bad. The skip rate is
skipped / (samples_read + shard faults): a shard fault counts as one failed read, so a dataset
whose every shard is missing reaches the limit too instead of waiting forever for a sample.
"""

from __future__ import annotations

import tarfile
from collections import Counter

SHARD_CAUSES = ("missing_shard", "unreadable_shard", "truncated_tar", "corrupt_tar", "empty_shard")
SAMPLE_CAUSES = ("missing_image", "missing_caption", "corrupt_image", "non_utf8_caption", "empty_caption")
CAUSES = SHARD_CAUSES + SAMPLE_CAUSES
MAX_TRACKED_SHARDS = 64  # per-shard skip counts kept per worker, only to name the worst shard


class LoaderStalled(RuntimeError):
    """A loader worker delivered nothing for data.timeout_s: a hang, not bad data (worth a requeue)."""


class DataError(RuntimeError):
    """The data cannot feed the run (too many bad samples); the message is one line naming the worst shard."""


def shard_fault(exn: BaseException) -> str:
    """The shard cause of an exception raised while opening or reading a tar shard."""
    if isinstance(exn, FileNotFoundError):
        return "missing_shard"
    if isinstance(exn, OSError):  # permissions, a directory, an I/O error
        return "unreadable_shard"
    message = str(exn.args[0]) if exn.args else ""
    if isinstance(exn, EOFError) or (isinstance(exn, tarfile.ReadError)
                                     and message.startswith(("unexpected end of data", "empty file"))):
        return "truncated_tar"
    return "corrupt_tar"  # tarfile.TarError, webdataset's duplicate-name ValueError, zlib errors


class SkipStats:
    """Skip counts by cause plus the shards with the most skips, mergeable across workers and picklable."""

    def __init__(self, counts: dict[str, int] | None = None, shards: dict[str, int] | None = None) -> None:
        self.counts = Counter(dict.fromkeys((*CAUSES, "samples_read"), 0))
        self.counts.update(counts or {})
        self.shards = Counter(shards or {})  # url -> skipped samples and shard faults

    def read(self, n: int = 1) -> None:
        self.counts["samples_read"] += n

    def skip(self, cause: str, url: str) -> None:
        self.counts[cause] += 1
        self.shards[url] += 1
        if len(self.shards) > MAX_TRACKED_SHARDS:  # forget the least-skipped shard: only the worst is named
            del self.shards[min(self.shards, key=self.shards.__getitem__)]

    def state(self) -> dict:
        return {"counts": dict(self.counts), "shards": dict(self.shards)}

    @classmethod
    def from_state(cls, state: dict) -> SkipStats:
        return cls(state["counts"], state["shards"])

    @classmethod
    def merged(cls, parts: list[SkipStats]) -> SkipStats:
        total = cls()
        for part in parts:
            total.counts.update(part.counts)
            total.shards.update(part.shards)
        return total

    @property
    def skipped(self) -> int:
        return sum(self.counts[c] for c in CAUSES)

    @property
    def attempts(self) -> int:
        return self.counts["samples_read"] + sum(self.counts[c] for c in SHARD_CAUSES)

    def check(self, max_rate: float, min_samples: int, where: str) -> None:
        """Raise DataError when more than `max_rate` of at least `min_samples` reads were skipped."""
        attempts, skipped = self.attempts, self.skipped
        if attempts < max(min_samples, 1) or skipped <= max_rate * attempts:
            return
        worst, worst_n = max(self.shards.items(), key=lambda kv: kv[1], default=("(none recorded)", 0))
        causes = ", ".join(f"{c} {self.counts[c]}" for c in CAUSES if self.counts[c])
        raise DataError(f"{where}: {skipped} of {attempts} reads skipped ({skipped / attempts:.1%} > "
                        f"data.max_skip_rate {max_rate:g}); worst shard {worst} ({worst_n} skipped); by cause: "
                        f"{causes}")
