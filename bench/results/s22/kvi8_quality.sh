#!/bin/bash
# kvi8: bench/kv_quality.py on this branch (int8 / fp8 through the C kernel) and int8 on main (PyTorch path), one lock.
WT=/work/wt-kvi8
flock -x /work/cpu.lock timeout 590 bash -c "
  cd $WT; echo \"== branch \$(git rev-parse --short HEAD) \$(date -u +%H:%M:%S)\"
  PYTHONPATH=$WT .venv/bin/python bench/kv_quality.py --dtypes float32 bfloat16 int8 fp8 --gemm-dtype float32 2>&1 | grep -v Loading
  cd /work/main; echo \"== main \$(git rev-parse --short HEAD) \$(date -u +%H:%M:%S)\"
  PYTHONPATH=/work/main $WT/.venv/bin/python bench/kv_quality.py --dtypes float32 int8 --gemm-dtype float32 2>&1 | grep -v Loading
  echo \"== end \$(date -u +%H:%M:%S)\"
"
