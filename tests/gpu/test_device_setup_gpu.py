"""The engine on CUDA: Triton backend + CUDA graphs vs eager, the memory plan, and bench/gpu_roofline.py's
tokenmill path. Skipped without CUDA."""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

from tests.model.tiny_models import VOCAB, save_tiny_model
from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROOT = Path(__file__).resolve().parents[2]
# token-id prompts only: no tokenizer, so the tests need nothing beyond torch, triton and transformers
ARGS = dict(device="cuda", skip_tokenizer_init=True, block_size=16, max_num_seqs=8, max_num_batched_tokens=64,
            max_model_len=256, gpu_memory_utilization=0.5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("tiny") / "llama"))


def _greedy(llm: LLM, n: int = 6, max_tokens: int = 24) -> list[list[int]]:
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randrange(5, 90))]}
               for _ in range(n)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_graphs_on_and_off_give_the_same_tokens(tiny_dir):
    graphs = LLM(tiny_dir, dtype="bfloat16", **ARGS)
    ds = graphs.engine.core.runner.device_setup
    assert ds.backend_name == "triton" and ds.graphs.captured_sizes == [1, 2, 4, 8]
    assert ds.plan is not None and ds.plan.num_blocks >= graphs.engine.core.runner.num_blocks
    got = _greedy(graphs)
    assert ds.num_graph_replays > 0
    eager = LLM(tiny_dir, dtype="bfloat16", enforce_eager=True, **ARGS)
    assert eager.engine.core.runner.device_setup.graphs.captured_sizes == []
    assert _greedy(eager) == got


def test_triton_matches_reference_on_cuda_fp32(tiny_dir):
    tri = LLM(tiny_dir, dtype="float32", **ARGS)
    ref = LLM(tiny_dir, dtype="float32", attention_backend="reference", **ARGS)
    assert ref.engine.core.runner.device_setup.graphs.captured_sizes == []  # reference is never captured
    assert _greedy(tri) == _greedy(ref)


def test_roofline_run_tokenmill_on_a_config_only_folder():
    spec = importlib.util.spec_from_file_location("gpu_roofline", ROOT / "bench" / "gpu_roofline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_roofline"] = mod
    spec.loader.exec_module(mod)
    r = mod.run_tokenmill(str(ROOT / "bench" / "configs" / "llama-3.2-1b.json"), num_prompts=4, prompt_len=64,
                          max_tokens=16, max_model_len=96, max_num_seqs=8)
    assert r["output_tokens"] == 64 and r["tokens_per_s"] > 0


def test_seeded_sampling_on_cuda(tiny_dir):
    """Requests with their own seed draw from a per-request generator: it must live on the logits' device
    (a CPU generator fails on CUDA tensors). Same seed -> same tokens, whatever else is in the batch."""
    llm = LLM(tiny_dir, dtype="float32", **ARGS)
    prompt = {"prompt_token_ids": list(range(3, 40))}

    def sample(seed: int, n: int = 1) -> list[list[int]]:
        sp = SamplingParams(temperature=1.0, max_tokens=16, seed=seed, ignore_eos=True)
        return [list(o.outputs[0].token_ids) for o in llm.generate([prompt] * n, sp, use_tqdm=False)]

    a = sample(7)[0]
    assert sample(7, n=3) == [a, a, a]
    assert sample(8)[0] != a
