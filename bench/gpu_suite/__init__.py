"""The GPU suite: one Python module per step, driven by bench/gpu_suite.sh (see docs/GPU_SUITE.md).

    python -m bench.gpu_suite STEP --work DIR [--dry-run] [--t0 EPOCH]   # one step -> DIR/STEP.json
    python -m bench.gpu_suite report --work DIR --out DIR                 # merge -> gpu_suite.json, table
"""
