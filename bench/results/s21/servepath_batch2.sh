set -u
P=/tmp/sp/prof.sh
cd /tmp/sp_base && cp /work/wt-servepath/bench/cpu_mixed_profile.py /work/wt-servepath/bench/cpu_decode_profile.py /tmp/sp/ 
echo "### inproc default spin"; OMP_NUM_THREADS=2 PYTHONPATH=/tmp/sp_base /work/main/.venv/bin/python /tmp/sp/cpu_mixed_profile.py --concurrency 64 --requests 192 2>&1 | grep -v Loading | tail -6
echo "### inproc spin 5000"; GOMP_SPINCOUNT=5000 OMP_NUM_THREADS=2 PYTHONPATH=/tmp/sp_base /work/main/.venv/bin/python /tmp/sp/cpu_mixed_profile.py --concurrency 64 --requests 192 2>&1 | grep -v Loading | tail -6
echo "### base"; $P /tmp/sp_base /tmp/sp/b2_base1 64
echo "### new"; $P /work/wt-servepath /tmp/sp/b2_new1 64
echo "### base"; $P /tmp/sp_base /tmp/sp/b2_base2 64
echo "### new"; $P /work/wt-servepath /tmp/sp/b2_new2 64
