"""OpenMP's wait policy in the engine and worker processes: libgomp's spin count is set before libgomp loads,
unless the user chose one."""
from __future__ import annotations

import multiprocessing
import pickle

from tokenmill.config import EngineConfig
from tokenmill.ops.cpu.host import OMP_SPIN_COUNT, tune_openmp_wait


def test_sets_the_spin_count_unless_the_user_chose():
    env: dict[str, str] = {}
    assert tune_openmp_wait(env) and env == {"GOMP_SPINCOUNT": str(OMP_SPIN_COUNT)}
    for user in ({"OMP_WAIT_POLICY": "active"}, {"OMP_WAIT_POLICY": "passive"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(user)
        assert not tune_openmp_wait(env) and env == user


def _loaded_before_tuning(config_bytes: bytes, q) -> None:
    """What a spawned engine process has loaded by the time its entry point runs: the spawn bootstrap imports the
    entry point's module and unpickles the config first."""
    import sys

    import tokenmill.engine.core_proc  # noqa: F401 - the engine process's target lives here
    import tokenmill.executor.multiproc  # noqa: F401 - and the workers'
    pickle.loads(config_bytes)
    with open("/proc/self/maps") as f:
        gomp = any("libgomp" in line or "libiomp" in line for line in f)
    q.put(("torch" in sys.modules, gomp))


def test_spawned_engine_process_has_not_loaded_openmp_before_its_entry_point():
    config = EngineConfig.from_kwargs(model="tiny-does-not-need-to-exist", num_threads=2)
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_loaded_before_tuning, args=(pickle.dumps(config), q))
    p.start()
    torch_loaded, gomp_loaded = q.get(timeout=120)
    p.join(30)
    assert not torch_loaded and not gomp_loaded


def test_the_cli_has_not_loaded_openmp_before_it_tunes_it():
    """`tokenmill ...` in-process commands set the spin count in main(), before any command imports torch."""
    import subprocess
    import sys

    code = ("import sys, tokenmill.cli; from tokenmill.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules, any('libgomp' in l for l in open('/proc/self/maps')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
