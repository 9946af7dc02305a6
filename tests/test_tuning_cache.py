"""The on-disk store of matmul tuning outcomes (``kernels/tuning_cache.py``) and how ``tune``
restores an entry. CPU: the store is plain files; cuBLASLt and the product check need CUDA,
so ``_restore`` runs here against stand-ins for the shape's descriptors and operands (the
real ones: tests/test_kernels_gpu.py, ``test_tuning_cache_restores_without_timing``)."""

from __future__ import annotations

import json
import math
import os
import threading

import pytest
import torch

from kernels import linear_tuning
from kernels.tuning_cache import FORMAT_VERSION, TuningCache, shape_key

ENTRY = {"algo": None, "baseline_us": 10.0, "best_us": 11.0, "choice": None, "tried": 3, "kept_ratio": None}


def test_entries_round_trip_per_environment(tmp_path):
    path = tmp_path / "sub" / "tuning.json"  # the directory is made on save
    h100 = TuningCache(path, "H100|sm90")
    assert h100.get("k") is None
    h100.put("k", ENTRY)
    h100.save()
    assert TuningCache(path, "H100|sm90").get("k") == ENTRY
    assert TuningCache(path, "H200|sm90").get("k") is None  # another card finds nothing
    data = json.loads(path.read_text())
    assert data["version"] == FORMAT_VERSION and list(data["environments"]) == ["H100|sm90"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["tuning.json", "tuning.json.lock"]  # no temporary file


def test_save_merges_with_what_another_process_wrote_meanwhile(tmp_path):
    """Two workers of a node start together: both read an empty file, each saves its own
    shapes; the file ends with both (and other environments' entries survive)."""
    path = tmp_path / "tuning.json"
    first, second, other = TuningCache(path, "A"), TuningCache(path, "A"), TuningCache(path, "B")
    first.put("x", ENTRY)
    second.put("y", {**ENTRY, "tried": 7})
    other.put("z", ENTRY)
    first.save()
    other.save()
    second.save()
    a = TuningCache(path, "A")
    assert a.get("x") == ENTRY and a.get("y")["tried"] == 7
    assert TuningCache(path, "B").get("z") == ENTRY


def test_save_writes_nothing_without_new_entries(tmp_path):
    path = tmp_path / "tuning.json"
    TuningCache(path, "A").save()
    assert not path.exists()
    cache = TuningCache(path, "A")
    cache.put("x", ENTRY)
    cache.save()
    stamp = path.stat().st_mtime_ns
    restored = TuningCache(path, "A")
    assert restored.get("x") == ENTRY
    restored.save()  # read only: the file is left as it is
    assert path.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 99, "environments": {"A": {"x": ENTRY}}}),
                                     json.dumps([1, 2]), json.dumps({"version": FORMAT_VERSION, "environments": 5})])
def test_an_unusable_file_is_ignored_and_replaced(tmp_path, caplog, content):
    path = tmp_path / "tuning.json"
    path.write_text(content)
    cache = TuningCache(path, "A")
    assert cache.get("x") is None
    assert "tuning afresh" in caplog.text
    cache.put("y", ENTRY)
    cache.save()
    assert TuningCache(path, "A").get("y") == ENTRY


def test_nan_timings_survive(tmp_path):
    """A shape with no usable candidate has no baseline time (NaN): it is stored and read back."""
    path = tmp_path / "tuning.json"
    cache = TuningCache(path, "A")
    cache.put("x", {**ENTRY, "baseline_us": float("nan"), "best_us": float("nan"), "tried": 0})
    cache.save()
    assert math.isnan(TuningCache(path, "A").get("x")["baseline_us"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_directory_raises_oserror(tmp_path):
    tmp_path.chmod(0o500)
    try:
        cache = TuningCache(tmp_path / "tuning.json", "A")
        cache.put("x", ENTRY)
        with pytest.raises(OSError):
            cache.save()
    finally:
        tmp_path.chmod(0o700)


def test_an_unwritable_path_raises_oserror(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = TuningCache(blocker / "tuning.json", "A")  # a file where the directory should be
    cache.put("x", ENTRY)
    with pytest.raises(OSError):
        cache.save()


def test_concurrent_saves_leave_a_whole_file_with_every_entry(tmp_path):
    """Readers racing writers never see half a file (atomic replace), and writers racing
    each other lose no entry (the merge holds the lock)."""
    path = tmp_path / "tuning.json"
    errors = []

    def write(i):
        for j in range(20):
            cache = TuningCache(path, "A")
            cache.put(f"{i}-{j}", ENTRY)
            cache.save()

    def read():
        for _ in range(200):
            if path.exists():
                try:
                    json.loads(path.read_text())
                except ValueError as e:
                    errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len(TuningCache(path, "A").entries) == 60  # merges under the lock lose nobody's entries


def test_shape_keys_tell_apart_what_changes_the_answer():
    bf16 = torch.bfloat16
    keys = {shape_key(256, 4096, 14336, bf16, True, 0.02, 32, 1), shape_key(256, 4096, 14336, bf16, False, 0.02, 32, 1),
            shape_key(256, 4096, 14336, torch.float16, True, 0.02, 32, 1),
            shape_key(256, 4096, 14336, bf16, True, -1.0, 32, 1), shape_key(128, 4096, 14336, bf16, True, 0.02, 32, 1),
            shape_key(256, 14336, 4096, bf16, True, 0.02, 32, 1), shape_key(256, 4096, 14336, bf16, True, 0.02, 1, 1),
            shape_key(256, 4096, 14336, bf16, True, 0.02, 32, 2)}
    assert len(keys) == 8


class _Shape:
    """Stands in for ``LtMatmul``: ``restore`` accepts only the bytes it was told to."""

    m, n, k = 256, 4096, 4096

    def __init__(self, accepts: bytes | None) -> None:
        self.accepts, self.restored = accepts, []

    def restore(self, algo: bytes):
        self.restored.append(algo)
        return f"candidate {algo.hex()}" if algo == self.accepts else None


class _Probe:
    def __init__(self, correct: bool) -> None:
        self.ok, self.checked = correct, []

    def correct(self, mm, cand, workspace) -> bool:
        self.checked.append(cand)
        return self.ok


def test_restore_takes_a_kept_algorithm_only_after_both_checks():
    algo = bytes(range(64))
    entry = {**ENTRY, "algo": algo.hex(), "choice": "(6, 18, 1, 0, 0, 0, 0)", "kept_ratio": 0.9}
    tuned, cand = linear_tuning._restore(entry, lambda: _Probe(True), _Shape(algo), None)
    assert cand == f"candidate {algo.hex()}" and tuned.cached and tuned.choice == entry["choice"]
    assert (tuned.rows, tuned.n, tuned.k, tuned.kept_ratio) == (256, 4096, 4096, 0.9)
    assert linear_tuning._restore(entry, lambda: _Probe(False), _Shape(algo), None) is None  # wrong product: time again
    shape = _Shape(accepts=None)  # cuBLASLt no longer accepts it for the shape
    assert linear_tuning._restore(entry, lambda: _Probe(True), shape, None) is None and shape.restored == [algo]


def test_restore_of_a_kept_baseline_checks_nothing():
    """Not even the operands are made (no allocation, no product at start-up)."""
    made, shape = [], _Shape(None)
    tuned, cand = linear_tuning._restore(ENTRY, lambda: made.append(1) or _Probe(True), shape, None)
    assert cand is None and tuned.cached and tuned.choice is None and tuned.tried == 3
    assert made == [] and shape.restored == []


@pytest.mark.parametrize("broken", [{}, {**ENTRY, "algo": "zz"}, {**ENTRY, "tried": "many"}, {**ENTRY, "algo": 5}])
def test_a_malformed_entry_means_timing_again(broken):
    assert linear_tuning._restore(broken, lambda: _Probe(True), _Shape(None), None) is None


def test_the_file_is_readable_by_others_and_versioned(tmp_path):
    from kernels.tuning_cache import file_name

    assert file_name() == f"matmul-tuning-v{FORMAT_VERSION}.json"
    path = tmp_path / file_name()
    cache = TuningCache(path, "A")
    cache.put("x", ENTRY)
    cache.save()
    assert path.stat().st_mode & 0o777 == 0o644  # pods of other users read a shared cache


class _Refusing(_Shape):
    def restore(self, algo: bytes):
        raise RuntimeError("cublasLtMatmul failed with cublasStatus 15")


class _Crashing(_Probe):
    def correct(self, mm, cand, workspace) -> bool:
        raise RuntimeError("cublasLtMatmul failed with cublasStatus 15")


def test_a_kept_algorithm_that_fails_to_run_means_timing_again():
    """cuBLASLt may refuse at run time what its check accepted: the shape is timed again
    (and its entry replaced), not the whole tuning given up."""
    algo = bytes(range(64))
    entry = {**ENTRY, "algo": algo.hex(), "choice": "c"}
    assert linear_tuning._restore(entry, lambda: _Probe(True), _Refusing(algo), None) is None
    assert linear_tuning._restore(entry, lambda: _Crashing(True), _Shape(algo), None) is None
    assert linear_tuning._restore({**entry, "kept_ratio": "fast"}, lambda: _Probe(True), _Shape(algo), None) is None
    assert linear_tuning._restore({**entry, "choice": 7}, lambda: _Probe(True), _Shape(algo), None) is None
