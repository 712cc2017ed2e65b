"""Benchmarks. `serve`: open-loop load against any OpenAI-compatible server (TTFT, TPOT, SLO attainment,
goodput). Import submodules directly: tokenmill.bench.serve, .workloads, .metrics, .report, .cli."""
