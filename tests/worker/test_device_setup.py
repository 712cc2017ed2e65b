"""DeviceSetup wiring on CPU: Triton (interpreted) vs reference end to end, backend selection, graph
pass-through, KV planning on a simulated device, and token-id-only engines (skip_tokenizer_init)."""
from __future__ import annotations

import importlib.util
import logging
import random

import pytest
import torch

from tests.model.tiny_models import VOCAB, save_tiny_model, tiny_config
from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError, InvalidRequestError, ModelLoadError
from tokenmill.ops.attention.backend import CpuAttentionBackend, ReferenceAttentionBackend
from tokenmill.ops.cpu.attention import cpu_attention_available
from tokenmill.worker.device_setup import DeviceSetup, profile_batch, select_attention_backend
from tokenmill.worker.forward_batch import build_forward_batch
from tokenmill.worker.graphs import CUDAGraphRunner
from tokenmill.worker.memory_planner import GiB, DeviceMemory

HAS_TRITON = importlib.util.find_spec("triton") is not None
CPU = torch.device("cpu")
# chunked prefill (16-token steps over 20/13/9-token prompts), then decode; blocks of 4
ENGINE_ARGS = dict(dtype="float32", block_size=4, max_num_batched_tokens=16, max_num_seqs=4, device="cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return save_tiny_model("smollm", str(tmp_path_factory.mktemp("tiny") / "smollm"))


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (20, 13, 9)]


def _greedy(llm: LLM, max_tokens: int = 5) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def reference_llm(tiny_dir, gguf_tokenizer_path) -> LLM:
    return LLM(tiny_dir, tokenizer=gguf_tokenizer_path, attention_backend="reference", **ENGINE_ARGS)


def test_reference_backend_is_installed(reference_llm):
    ds = reference_llm.engine.core.runner.device_setup
    assert ds.backend_name == "reference"
    model = reference_llm.engine.core.runner.model
    assert all(isinstance(a.backend, ReferenceAttentionBackend) for a in model.attention_layers())


def test_auto_on_cpu_selects_cpu_kernel_when_it_builds():
    want = CpuAttentionBackend if cpu_attention_available() else ReferenceAttentionBackend
    assert isinstance(select_attention_backend("auto", CPU), want)
    assert isinstance(select_attention_backend("reference", CPU), ReferenceAttentionBackend)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_engine_matches_reference(tiny_dir, gguf_tokenizer_path, reference_llm):
    llm = LLM(tiny_dir, tokenizer=gguf_tokenizer_path, attention_backend="triton", **ENGINE_ARGS)
    runner = llm.engine.core.runner
    assert runner.device_setup.backend_name == "triton"
    assert all(type(a.backend).__name__ == "TritonAttentionBackend" for a in runner.model.attention_layers())
    got = _greedy(llm)
    want = _greedy(reference_llm)
    assert got == want
    assert all(len(t) == 5 for t in got)


def test_bad_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="attention_backend"):
        EngineConfig.from_kwargs(attention_backend="flash")
    with pytest.raises(ConfigError, match="attention_backend"):
        select_attention_backend("flash", CPU)


def test_triton_not_installed_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(ConfigError, match="triton package is not installed") as e:
        EngineConfig.from_kwargs(attention_backend="triton")
    assert "\n" not in str(e.value)
    assert isinstance(select_attention_backend("auto", torch.device("cuda")), ReferenceAttentionBackend)


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_graph_runner_is_a_pass_through_on_cpu(reference_llm, enforce_eager):
    runner = reference_llm.engine.core.runner
    cfg = EngineConfig.from_kwargs(enforce_eager=enforce_eager, **ENGINE_ARGS)
    ds = DeviceSetup(cfg, CPU)
    ds.attach(runner.model)
    kv = [torch.zeros_like(c) for c in runner.kv_caches]
    assert ds.capture(kv, runner.max_model_len, runner.block_size) == 0
    assert isinstance(ds.graphs, CUDAGraphRunner) and not ds.graphs.enabled and ds.graphs.captured_sizes == []
    prefill = build_forward_batch([[5, 6, 7], [8, 9]], [0, 0], [[1], [2]], runner.block_size)
    ds.forward(prefill)
    kv_eager = [c.clone() for c in kv]
    decode = build_forward_batch([[10], [11]], [3, 2], [[1], [2]], runner.block_size)
    with torch.inference_mode():
        got = ds.forward(decode)
        want = runner.model(decode.input_ids, decode.positions, kv_eager, decode)
    assert got.shape == (2, runner.model.hidden_size)
    assert torch.equal(got, want)
    assert ds.num_graph_replays == 0


def test_profile_forward_runs_on_a_one_block_cache(reference_llm):
    runner = reference_llm.engine.core.runner
    b = profile_batch(40, 16, 8, 4, CPU)
    assert b.query_lens_cpu == [16, 16, 8] and b.num_tokens == 40
    assert (b.slot_mapping == -1).all() and int(b.block_tables.max()) == 0
    assert profile_batch(100, 512, 2, 4, CPU).query_lens_cpu == [100]
    assert profile_batch(100, 30, 2, 4, CPU).query_lens_cpu == [30, 30]  # at most max_num_seqs sequences
    ds = runner.device_setup
    ds.profile_forward(runner.model, 24, runner.max_model_len, runner.block_size, runner.dtype)  # no error


def _sim(total_gib: float, weights_gib: float, act_gib: float) -> DeviceMemory:
    return DeviceMemory(total_bytes=int(total_gib * GiB), weights_bytes=int(weights_gib * GiB),
                        peak_activation_bytes=int(act_gib * GiB), other_bytes=GiB // 2, name="simulated GPU")


LLAMA8B_BLOCK = 32 * 2 * 8 * 128 * 2 * 16  # bf16, 16-token blocks: 2 MiB


def test_plan_on_simulated_gpu_logs_table_and_reserves_graph_memory(caplog):
    cuda = torch.device("cuda")  # DeviceSetup touches no device for planning
    dev = _sim(80, 15, 2)
    eager = DeviceSetup(EngineConfig.from_kwargs(enforce_eager=True, attention_backend="reference"), cuda)
    with caplog.at_level(logging.INFO, logger="tokenmill.worker.device_setup"):
        plan = eager.plan_from_measurement(dev, LLAMA8B_BLOCK, 16, 8192)
    assert plan.cuda_graph_bytes == 0 and eager.plan is plan
    assert "memory plan for simulated GPU" in caplog.text and "KV cache" in caplog.text
    room = int(80 * GiB * 0.9) - int(15 * GiB) - GiB // 2 - int(2 * GiB)
    assert plan.num_blocks == room // LLAMA8B_BLOCK
    if HAS_TRITON:  # auto on CUDA -> triton -> graphs are captured: their memory is set aside
        graphs = DeviceSetup(EngineConfig.from_kwargs(), cuda)
        gplan = graphs.plan_from_measurement(dev, LLAMA8B_BLOCK, 16, 8192)
        assert gplan.cuda_graph_bytes > 0 and gplan.num_blocks < plan.num_blocks


def test_plan_that_cannot_fit_raises_or_lowers_max_model_len():
    cuda = torch.device("cuda")
    dev = _sim(24, 16, 1)  # ~4 GiB left: 2048 blocks of 16 tokens = 32k tokens
    strict = DeviceSetup(EngineConfig.from_kwargs(max_model_len=100_000, enforce_eager=True), cuda)
    with pytest.raises(ConfigError, match="max_model_len") as e:
        strict.plan_from_measurement(dev, LLAMA8B_BLOCK, 16, 100_000)
    assert "\n" not in str(e.value)
    loose = DeviceSetup(EngineConfig.from_kwargs(enforce_eager=True), cuda)  # max_model_len = model's
    plan = loose.plan_from_measurement(dev, LLAMA8B_BLOCK, 16, 100_000)
    assert 0 < plan.num_blocks * 16 < 100_000  # the runner then lowers max_model_len to what fits
    with pytest.raises(ConfigError, match="gpu_memory_utilization|dtype"):
        loose.plan_from_measurement(_sim(16, 15.9, 1), LLAMA8B_BLOCK, 16, 4096)


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("config_only")
    tiny_config("llama").save_pretrained(str(folder))
    return str(folder)


def test_skip_tokenizer_init_runs_a_config_only_folder(config_only_dir):
    llm = LLM(config_only_dir, load_format="dummy", skip_tokenizer_init=True, **ENGINE_ARGS)
    assert llm.get_tokenizer() is None
    outs = _greedy(llm, max_tokens=3)
    assert [len(t) for t in outs] == [3, 3, 3] and all(0 <= x < VOCAB for t in outs for x in t)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == "" and len(out.token_ids) == 2
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate("hello", SamplingParams(max_tokens=2))


def test_config_only_folder_without_tokenizer_says_what_to_do(config_only_dir):
    with pytest.raises(ModelLoadError, match="skip_tokenizer_init") as e:
        LLM(config_only_dir, load_format="dummy", **ENGINE_ARGS)
    assert "\n" not in str(e.value)
