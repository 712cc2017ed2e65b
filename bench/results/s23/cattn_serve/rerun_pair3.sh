while kill -0 31950 2>/dev/null; do sleep 3; done
for side in base new; do
  d=/tmp/cattn_$side
  echo "=== served pair 3 $side $(date -u +%H:%M:%S)"
  rm -rf /tmp/cattn_sp_${side}_3
  (cd $d && flock -x /work/cpu.lock timeout 590 env CONC="16 64" OUTLEN=96 OUT=/tmp/cattn_sp_${side}_3 \
    TM_VENV=/work/main/.venv PYTHONPATH=$d bash /work/shared/bench/serve_peers/run.sh tm-bf16 > /dev/null 2>&1)
  echo "--- done $(date -u +%H:%M:%S)"
done
