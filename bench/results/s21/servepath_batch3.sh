set -u
RUN=/work/shared/bench/serve_peers/run.sh
one() { # name tree [env...]
  local name=$1 tree=$2; shift 2
  echo "### $name $(date +%T)"
  (cd $tree && env "$@" TM_VENV=/work/main/.venv PYTHONPATH=$tree CONC="16 64" OUTLEN=96 OUT=/tmp/sp/b3_$name bash $RUN tm 2>&1 | grep -E "ready|^tm-c" | cut -c1-330)
  (cd /tmp && env PYTHONPATH=$tree /work/main/.venv/bin/python -c 'import tokenmill; print("tree", tokenmill.__file__)')
}
rm -rf /tmp/sp/b3_*
one base1 /tmp/sp_base X=1
one new1 /work/wt-servepath X=1
one spin1 /work/wt-servepath GOMP_SPINCOUNT=30000
one base2 /tmp/sp_base X=1
one new2 /work/wt-servepath X=1
one spin2 /work/wt-servepath GOMP_SPINCOUNT=30000
