"""The brute-force model the prefix-index tests compare against: a set of block hashes per worker."""

from __future__ import annotations


def brute_overlaps(sets: dict[str, set[int]], hashes: list[int]) -> dict[str, int]:
    """Per worker, how many leading ``hashes`` it holds (workers holding none are left out)."""
    out = {}
    for w, held in sets.items():
        n = 0
        while n < len(hashes) and hashes[n] in held:
            n += 1
        if n:
            out[w] = n
    return out
