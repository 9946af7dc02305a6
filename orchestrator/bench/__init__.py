"""``kvmesh bench``: a load generator that measures serving as production traffic sees it.

Module map (one concept each):

- ``cli.py``        arguments (``add_bench_args``) and entry point (``run_bench``)
- ``config.py``     ``BenchConfig``: every setting of one invocation
- ``session.py``    connect, then warm up / measure / report each load point; sweeps
- ``arrivals.py``   Poisson, gamma, offline, trace replay, closed loop
- ``workloads.py``  request shapes: random, dataset, shared-prefix, multi-turn, trace
- ``tokens.py``     prompt tokens from the model's real vocabulary, exact lengths
- ``runner.py``     sends on schedule, records every chunk's arrival, measures its own overhead
- ``backends/``     transports: the router's gRPC API, OpenAI-compatible HTTP
- ``records.py``    what was asked, sent and received per request
- ``metrics.py``    TTFT, TPOT, ITL, E2E, percentiles, throughput, goodput, cache hit rate
- ``report.py``     JSON document, per-request CSV, terminal summary, measurement warnings
- ``plots.py``      latency CDFs, throughput over time, latency against throughput
- ``compare.py``    two results side by side
- ``progress.py``   the live progress line
- ``instant_server.py``  TEST DOUBLE server that answers at once
- ``overhead.py``   the tool's own capacity against the instant server (docs/PERFORMANCE.md)

Definitions of every metric: docs/BENCHMARKING.md.
"""
