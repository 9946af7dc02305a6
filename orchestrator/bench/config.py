"""One benchmark invocation's settings: a frozen dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.bench.arrivals import Arrivals
from orchestrator.bench.backends import BACKENDS
from orchestrator.bench.metrics import Slo
from orchestrator.bench.workloads import WorkloadConfig

PROMPT_FORMATS = ("tokens", "text")


@dataclass(frozen=True)
class BenchConfig:
    backend: str = "grpc"
    """``grpc`` (the router's kvmesh.v1.Generation API) or ``openai`` (/v1/completions)."""
    target: str = "127.0.0.1:50051"
    """host:port for grpc, base URL for openai."""
    model: str = ""
    """Model to request; empty = the only one the target lists."""
    tokenizer: str | None = None
    """Tokenizer for synthetic prompts (directory, tokenizer.json or embedded model name); None = smollm2."""
    prompt_format: str = "tokens"
    """Send prompts as token ids (exact lengths) or as text."""
    points: tuple[Arrivals, ...] = (Arrivals("offline"),)
    """One measurement per arrival process; more than one is a sweep."""
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    trace_path: str | None = None
    """The trace file, when one was given (for the report)."""
    warmup: int = 2
    """Requests sent and discarded before each measurement."""
    seed: int = 0
    """Point i of a sweep uses seed + i (fresh prompts, so no reuse across points)."""
    max_duration_s: float = 600.0
    """No request is issued later than this into a point."""
    request_timeout_s: float = 300.0
    """Per-request limit (gRPC deadline / HTTP total timeout)."""
    ignore_eos: bool = True
    """Ask for exact output lengths."""
    temperature: float = 0.0
    cache_salt: str = ""
    """Sent with every request: a prefix-cache namespace of its own, so a run can
    repeat an earlier one's prompts on the same server without its warm cache."""
    slo: Slo = field(default_factory=Slo)
    """Objectives for goodput; none by default."""
    slo_attainment: float = 0.9
    """A sweep's goodput point is the highest load where this fraction met every SLO (DistServe)."""
    late_threshold_ms: float = 10.0
    """A request sent later than this after it was due counts as late."""
    output_dir: str = "bench-results"
    name: str = ""
    """File name stem; empty = BACKEND-WORKLOAD-TIMESTAMP."""
    plots: bool = True
    progress: bool = True
    """Show the live progress line."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {self.prompt_format!r}; valid: {', '.join(PROMPT_FORMATS)}")
        if not self.points:
            raise ValueError("at least one load point (rate or concurrency) is needed")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        for name in ("max_duration_s", "request_timeout_s", "late_threshold_ms"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.slo_attainment <= 1:
            raise ValueError(f"slo_attainment must be in (0, 1], got {self.slo_attainment}")

    @property
    def sweep(self) -> bool:
        return len(self.points) > 1

    def to_json(self) -> dict[str, Any]:
        """Every setting, with the trace's contents replaced by its path."""
        out = asdict(self)
        out["points"] = [{"kind": p.kind, "label": p.label(), "rate": p.rate, "burstiness": p.burstiness,
                          "concurrency": p.concurrency, "speedup": p.speedup} for p in self.points]
        out["workload"].pop("trace", None)
        out["workload"]["input_len"] = self.workload.input_len.describe()
        out["workload"]["output_len"] = self.workload.output_len.describe()
        out["slo_text"] = self.slo.describe()
        return out

    def describe_workload(self) -> str:
        w = self.workload
        text = f"{w.kind}: input {w.input_len.describe()}, output {w.output_len.describe()}"
        if w.kind == "shared-prefix":
            text += f", {w.num_prefixes} prefixes of {w.prefix_len}"
        elif w.kind == "multi-turn":
            text += f", {w.num_turns} turns per conversation"
        elif w.kind == "dataset":
            text = f"dataset {w.dataset} (output {w.output_len.describe()} where not given)"
        elif w.kind == "trace":
            text = f"trace {self.trace_path}"
        return text + (", ignore_eos" if self.ignore_eos else "")
