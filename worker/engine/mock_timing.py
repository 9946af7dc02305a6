"""The mock engine's timing model: how long a step would take on a real device.

Torch-free (the CLI reads its defaults without importing the engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class TimingModel:
    """How long one engine step takes, as a function of what it computes.

    A step prefilling ``P`` prompt tokens (tokens that are not prefix-cache
    hits: the scheduler never schedules those) and decoding ``B`` sequences
    whose contexts sum to ``C`` tokens takes::

        (a * P  +  [B > 0] * (b + c * B + d * C)) / speedup

    Defaults approximate Llama-3-8B bf16 on one H100 (docs/FIELD figures):
    ~25 ms to prefill 1k tokens, ~6 ms for a batch-1 decode step, and the KV
    reads of 128 KiB per context token at ~3 TB/s.
    """

    prefill_s_per_token: float = 25e-6
    """``a``: seconds per uncached prompt token computed."""

    decode_base_s: float = 6e-3
    """``b``: fixed cost of a step that decodes (weights read once)."""

    decode_s_per_seq: float = 30e-6
    """``c``: added per decoding sequence in the batch."""

    decode_s_per_context_token: float = 44e-9
    """``d``: added per context token the decoding sequences attend to."""

    speedup: float = 1.0
    """Every step takes ``1 / speedup`` of the modelled time (e.g. 10 runs a
    study ten times faster than real time, with the same relative costs)."""

    def __post_init__(self) -> None:
        for name in ("prefill_s_per_token", "decode_base_s", "decode_s_per_seq", "decode_s_per_context_token"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {self.speedup}")

    def step_seconds(self, plan: SchedulerOutput) -> float:
        """Modelled wall time of ``plan``; a sequence advancing by one token decodes."""
        prefill_tokens = decode_seqs = decode_context = 0
        for item in plan.scheduled:
            if item.num_new_tokens == 1:
                decode_seqs += 1
                decode_context += item.seq.num_computed_tokens + 1
            else:
                prefill_tokens += item.num_new_tokens
        seconds = self.prefill_s_per_token * prefill_tokens
        if decode_seqs:
            seconds += (self.decode_base_s + self.decode_s_per_seq * decode_seqs
                        + self.decode_s_per_context_token * decode_context)
        return seconds / self.speedup
