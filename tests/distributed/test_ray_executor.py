"""Tensor parallelism through the Ray executor: two rank actors in a placement group on a local Ray cluster
started by the test; greedy tokens equal the in-process TP=1 run (chunked prefill, preemption, prefix hits)."""
from __future__ import annotations

import time

import pytest

from tests.distributed.test_tensor_parallel import _generate, _prompts
from tests.model.tiny_models import save_tiny_model

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tokenmill[ray]')")


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False,
                 configure_logging=False)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"a local Ray cluster cannot start here: {type(e).__name__}: {e}")
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "llama_mqa"])
def test_ray_tp2_greedy_equals_tp1(ray_cluster, tmp_path, gguf_tokenizer_path, arch):
    from tokenmill.executor.ray_executor import RayExecutor

    path = save_tiny_model(arch, str(tmp_path / arch))
    prompts = _prompts(len(arch))
    ref, _ = _generate(path, gguf_tokenizer_path, prompts)
    got, stats = _generate(path, gguf_tokenizer_path, prompts, tensor_parallel_size=2,
                           distributed_executor_backend="ray")
    assert stats["executor"] is RayExecutor
    assert got == ref
    assert stats["preemptions"] > 0 and stats["prefix_hits"] > 0 and stats["used"] == 0, stats
    for _ in range(300):  # the actors and the placement group are released (Ray frees them asynchronously)
        if ray_cluster.available_resources().get("CPU") == 4:
            break
        time.sleep(0.1)
    assert ray_cluster.available_resources().get("CPU") == 4
