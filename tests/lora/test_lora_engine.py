"""Multi-LoRA vs transformers + peft (merged) on tiny random models: greedy tokens equal for every adapter, with
a batch mixing several adapters and the base model, chunked prefill, preemption, max_loras below the adapters in
the batch; adapter checks (rank, modules) refused with a clear error; the prefix cache keeps adapters apart."""
from __future__ import annotations

import pytest

from tests.engine.test_correctness import _prompts, hf_greedy
from tests.exact import exact_llm
from tests.lora.adapters import make_adapter
from tests.model.tiny_models import build_tiny_model, save_tiny_model
from tokenmill import LLM, LoRARequest, SamplingParams
from tokenmill.errors import ConfigError, InvalidRequestError

NEW = 8
# (rank, targets, rslora) per adapter: different ranks and module sets
SPECS = [(8, ["q_proj", "v_proj"], False), (4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"], True), (2, ["o_proj", "down_proj", "up_proj"], False)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    arch = request.param
    base = str(tmp_path_factory.mktemp(arch))
    save_tiny_model(arch, base)
    adapters = []
    for i, (rank, targets, rs) in enumerate(SPECS):
        path = str(tmp_path_factory.mktemp(f"{arch}_lora{i}"))
        merged = make_adapter(arch, path, rank, targets, seed=10 + i, rslora=rs)
        adapters.append((LoRARequest(f"a{i}", i + 1, path), merged))
    prompts = _prompts(1, 6)
    oracle = {None: [hf_greedy(build_tiny_model(arch), p, NEW)[0] for p in prompts]}
    for lr, merged in adapters:
        oracle[lr.lora_int_id] = [hf_greedy(merged, p, NEW)[0] for p in prompts]
    return arch, base, [a for a, _ in adapters], prompts, oracle


SCENARIOS = {"default": {}, "chunked_prefill": {"max_num_batched_tokens": 8, "block_size": 4},
             "preemption": {"num_kv_blocks": 20, "block_size": 4}, "max_loras_1": {"max_loras": 1}}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_mixed_batch_matches_peft(setup, gguf_tokenizer_path, scenario):
    arch, base, loras, prompts, oracle = setup
    args = {"max_loras": 3, "max_lora_rank": 8, **SCENARIOS[scenario]}
    llm = exact_llm(base, tokenizer=gguf_tokenizer_path, dtype="float32", enable_lora=True,
                    max_cpu_loras=3, **args)
    # every prompt under every adapter and the base, all in one generate call: one batch mixes them
    choices = [None] + loras
    reqs = [(p, c) for c in choices for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in reqs], params, use_tqdm=False,
                        lora_request=[c for _, c in reqs])
    for (p, c), out in zip(reqs, outs):
        want = oracle[c.lora_int_id if c else None][prompts.index(p)]
        assert out.outputs[0].token_ids == want, (arch, scenario, c)
    core = llm.engine.core
    assert core.scheduler.kv.num_used_blocks == 0
    if scenario == "preemption":
        assert core.scheduler.num_preemptions > 0
    stats = core.stats()
    assert stats.lora_requests == {"a0": len(prompts), "a1": len(prompts), "a2": len(prompts)}
    assert stats.lora_generation_tokens["a1"] == NEW * len(prompts)


def test_adapters_do_not_share_prefix_cache(setup, gguf_tokenizer_path):
    arch, base, loras, prompts, oracle = setup
    llm = exact_llm(base, tokenizer=gguf_tokenizer_path, dtype="float32", enable_lora=True, max_loras=2, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    p = prompts[3]  # long enough for cached blocks
    for lr in [None, loras[0], None, loras[0], loras[1]]:  # each run reuses only its own adapter's blocks
        out = llm.generate({"prompt_token_ids": p}, params, use_tqdm=False, lora_request=lr)[0]
        assert out.outputs[0].token_ids == oracle[lr.lora_int_id if lr else None][3]


def test_lru_reload_and_remove(setup, gguf_tokenizer_path):
    """max_cpu_loras=1 with two adapters: each use drops the other, which is read again from its folder."""
    arch, base, loras, prompts, oracle = setup
    llm = exact_llm(base, tokenizer=gguf_tokenizer_path, dtype="float32", enable_lora=True, max_loras=1)
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    for lr in [loras[0], loras[2], loras[0]]:
        out = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False, lora_request=lr)[0]
        assert out.outputs[0].token_ids == oracle[lr.lora_int_id][0]
    assert llm.list_loras() == {1, 3}
    assert llm.engine.core.stats().lora_reloads >= 1
    assert llm.remove_lora(1) and not llm.remove_lora(1)
    assert llm.list_loras() == {3}


def test_refusals(setup, gguf_tokenizer_path, tmp_path):
    arch, base, loras, prompts, oracle = setup
    big = str(tmp_path / "big")
    make_adapter(arch, big, 32, ["q_proj"], seed=1)
    llm = LLM(base, tokenizer=gguf_tokenizer_path, dtype="float32", enable_lora=True, max_lora_rank=8)
    with pytest.raises(InvalidRequestError, match="max_lora_rank"):
        llm.add_lora(LoRARequest("big", 9, big))
    with pytest.raises(InvalidRequestError, match="not found"):
        llm.add_lora(LoRARequest("nope", 9, str(tmp_path / "missing")))
    with pytest.raises(InvalidRequestError, match="already loaded"):
        llm.add_lora(LoRARequest("a0", 1, loras[0].lora_path)) and llm.add_lora(LoRARequest("a0", 2, loras[1].lora_path))
    plain = LLM(base, tokenizer=gguf_tokenizer_path, dtype="float32")
    with pytest.raises(InvalidRequestError, match="enable_lora"):
        plain.generate([1, 2, 3], lora_request=loras[0], use_tqdm=False)
    with pytest.raises(ConfigError, match="name=path"):
        LLM(base, tokenizer=gguf_tokenizer_path, enable_lora=True, lora_modules=["nopath"])
