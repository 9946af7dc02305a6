"""``python -m orchestrator.bench``: the same as ``kvmesh bench``."""

from orchestrator.bench.cli import main

raise SystemExit(main())
