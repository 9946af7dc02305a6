"""The start-up matmul tuning's outcomes kept on disk, so a restarted worker skips the timing.

``linear_tuning.tune`` times cuBLASLt's candidates for every hot matmul shape at start
(12-13 s for the 79 shapes of a Llama-3-8B engine on an H100): start-up time every
replacement pod and every scale-up pays again for the same answer. The answer depends on
the card, the cuBLASLt build and the shape, not on the weights, so it is kept per
*environment* (GPU name, compute capability, SM count, cuBLASLt and torch versions): a
different card or library version finds no entries and tunes afresh. An entry holds the
kept algorithm's opaque bytes (or none: ``F.linear`` stays) and the timings it was chosen
by; ``tune`` re-checks a restored algorithm (cuBLASLt must accept it for the shape, and
its product must match ``F.linear``'s) before using it, and times the shape again if not.

One JSON file per format version (``file_name``), ``{"version": 1, "environments": {env:
{shape key: entry}}}``, world-readable so pods of other users can share it. Writes
merge with what the file holds by then, under an advisory lock beside it (workers of one
node starting together each add their shapes, none lost), and replace it atomically (a
reader never sees half a file). An unreadable
or foreign file is ignored with a warning and overwritten on save: the cache only ever
saves time. The lock is advisory (``flock``): on a network volume that does not honour it,
two writers may drop each other's new entries, which the next start times again. To
re-time everything, delete the file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def file_name() -> str:
    """The cache's file name: versioned, so two kvmesh versions sharing a directory (a rolling
    upgrade) keep separate files instead of overwriting each other's."""
    return f"matmul-tuning-v{FORMAT_VERSION}.json"


def environment(device: torch.device) -> str:
    """What a tuning outcome holds for: the card, and the libraries that ran it."""
    from kernels.cublaslt import library_version

    props = torch.cuda.get_device_properties(device)
    return (f"{props.name}|sm{props.major}{props.minor}|{props.multi_processor_count} SMs|"
            f"cublasLt {library_version()}|torch {torch.__version__}")


def shape_key(rows: int, n: int, k: int, dtype: torch.dtype, accumulate: bool, min_gain: float, weights: int,
              tuner: int) -> str:
    """An entry's key: the product ``[rows, k] @ [n, k].T`` in ``dtype``, whether it adds into
    its output, the margin a candidate had to beat ``F.linear`` by, how many distinct weights
    the timing ran over (one stays in L2, 32 do not) and the tuner's version."""
    return (f"{rows}x{n}x{k}|{str(dtype).removeprefix('torch.')}|{'acc' if accumulate else 'out'}|gain {min_gain:g}|"
            f"{weights} weights|tuner {tuner}")


class TuningCache:
    """The entries of one environment in the file at ``path`` (read once, at construction)."""

    def __init__(self, path: Path, env: str) -> None:
        self.path, self.env = Path(path), env
        self.entries: dict[str, dict] = dict(self._read().get(env, {}))
        self._new: dict[str, dict] = {}

    def _read(self) -> dict[str, dict]:
        """Every environment's entries in the file; {} if there is none or it cannot be used."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("matmul tuning cache %s unreadable (%s): tuning afresh", self.path, e)
            return {}
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(
                data.get("environments"), dict):
            logger.warning("matmul tuning cache %s has another format: tuning afresh", self.path)
            return {}
        return {env: entries for env, entries in data["environments"].items() if isinstance(entries, dict)}

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = self._new[key] = entry

    def save(self) -> None:
        """Add this run's new entries to the file (merged with its current content) and
        replace it atomically. Raises OSError if the directory cannot be written."""
        if not self._new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)  # read-merge-write as one step among this node's writers
            environments = self._read()
            environments.setdefault(self.env, {}).update(self._new)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
            try:
                # readable by the other users a shared cache serves (set outright: reading the
                # umask means setting it, process-wide, under other threads)
                os.fchmod(fd, 0o644)
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": FORMAT_VERSION, "environments": environments}, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())  # the new content is on disk before it replaces the old
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        finally:
            os.close(lock_fd)
        self._new.clear()
