"""kv_eviction="streaming" through the whole engine on tiny random-weight models: the same greedy tokens as a
normal request until the first eviction; after evictions, the logits equal a plain transformers forward over
the sink + window token ids at positions 0..n-1 (StreamingLLM); hundreds of tokens past the window with
bounded blocks and no leaks; preemption resumes exactly; bad input is refused."""
from __future__ import annotations

import random

import pytest
import pydantic
import torch

from tests.exact import exact_llm
from tests.model.tiny_models import VOCAB, build_tiny_model, save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError, PromptTooLongError

ARCHS = ["llama", "qwen2"]  # llama3 rope scaling + GQA; rope theta 1e6 + qkv biases + tied embeddings
BS, SINK, WINDOW = 4, 4, 32
MAX_CACHE = SINK + WINDOW + BS  # the most tokens a streaming request holds in its cache
MAX_BLOCKS = MAX_CACHE // BS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """arch -> (folder, transformers model)."""
    out = {}
    for arch in ARCHS:
        out[arch] = (save_tiny_model(arch, str(tmp_path_factory.mktemp(arch))), build_tiny_model(arch))
    return out


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _llm(path: str, tok: str, **kw) -> LLM:
    """float32 K/V unless kw says otherwise: logits are compared with transformers within 1e-3 (tests/exact.py)."""
    args = dict(dtype="float32", block_size=BS, streaming_sink_tokens=SINK, streaming_window_tokens=WINDOW)
    args.update(kw)
    return exact_llm(path, tokenizer=tok, **args)


def _sp(n: int, streaming: bool = True) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, kv_eviction="streaming" if streaming else None)


def _greedy(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0, "KV blocks leaked"
    return [o.outputs[0].token_ids for o in outs]


def _capture_logits(llm: LLM) -> list[torch.Tensor]:
    """Record every logits tensor the runner computes (the real model's output, unchanged)."""
    model, captured = llm.engine.core.runner.model, []
    orig = model.compute_logits

    def compute_logits(h: torch.Tensor) -> torch.Tensor:
        captured.append(orig(h))
        return captured[-1]

    model.compute_logits = compute_logits
    return captured


def test_same_tokens_as_a_normal_request_until_the_first_eviction(tiny, gguf_tokenizer_path):
    path, _ = tiny["llama"]
    prompt = _prompt(1, 20)
    llm = _llm(path, gguf_tokenizer_path)
    normal, streaming = _greedy(llm, [prompt, prompt], [_sp(40, False), _sp(40)])
    # output j is sampled from a context of 20 + j tokens: no eviction while that is <= MAX_CACHE
    same = MAX_CACHE - len(prompt) + 1
    assert streaming[:same] == normal[:same]
    assert len(streaming) == 40


class StreamingOracle:
    """transformers with its DynamicCache managed the StreamingLLM way, independently of tokenmill: before a
    token would make the cache exceed sinks + window + one block, drop the oldest non-sink block of every layer
    and re-rotate the later keys by -BS positions with transformers' own rotary embedding; a new token's
    position is its index in the cache."""

    def __init__(self, hf, prompt: list[int]):
        from transformers import DynamicCache

        self.hf, self.cache = hf, DynamicCache(config=hf.config)
        self.logits = hf(torch.tensor([prompt]), past_key_values=self.cache, use_cache=True).logits[0, -1]
        self.len = len(prompt)

    def _evict(self) -> None:
        from transformers.models.llama.modeling_llama import rotate_half

        layer0 = self.cache.layers[0].keys  # [1, Hkv, T, D]
        cos, sin = self.hf.model.rotary_emb(layer0, torch.tensor([[-BS]]))  # [1, 1, D]: rotation by -BS
        for layer in self.cache.layers:
            rest = layer.keys[:, :, SINK + BS:]
            rest = rest * cos[:, None] + rotate_half(rest) * sin[:, None]
            layer.keys = torch.cat([layer.keys[:, :, :SINK], rest], dim=2)
            layer.values = torch.cat([layer.values[:, :, :SINK], layer.values[:, :, SINK + BS:]], dim=2)
        self.len -= BS

    def step(self, tok: int) -> torch.Tensor:
        if self.len + 1 > MAX_CACHE:
            self._evict()
        out = self.hf(torch.tensor([[tok]]), position_ids=torch.tensor([[self.len]]), past_key_values=self.cache,
                      use_cache=True)
        self.len += 1
        self.logits = out.logits[0, -1]
        return self.logits


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_logits_equal_transformers_with_a_streaming_cache(arch, tiny, gguf_tokenizer_path):
    """Every step's logits, before and long after evictions, equal transformers running the same StreamingLLM
    cache policy (sinks kept, oldest blocks dropped, keys re-rotated to cache positions)."""
    path, hf = tiny[arch]
    llm = _llm(path, gguf_tokenizer_path, max_model_len=64)
    captured = _capture_logits(llm)
    eng, runner = llm.engine, llm.engine.core.runner
    prompt = _prompt(2, 30)
    eng.add_request("r", None, _sp(90), prompt_token_ids=prompt)
    oracle, max_evicted, tokens = StreamingOracle(hf, prompt), 0, []
    while eng.has_unfinished_requests():
        n_before = len(captured)
        for out in eng.step():
            tokens = out.outputs[0].token_ids
        if len(captured) == n_before:
            continue
        if len(tokens) > 1:  # the logits of output j (j >= 1) come from a forward over output j-1
            oracle.step(tokens[-2])
        got = captured[-1][-1]
        assert torch.isfinite(got).all()
        assert (got - oracle.logits).abs().max().item() < 1e-3, (arch, len(tokens))
        if runner.states:
            max_evicted = max(max_evicted, next(iter(runner.states.values())).num_evicted_tokens)
    assert len(tokens) == 90 and max_evicted >= 30 + 90 - MAX_CACHE - BS  # many evictions, every step checked
    assert eng.core.scheduler.kv.num_used_blocks == 0


@pytest.mark.slow
def test_stable_generation_far_past_the_window_bounded_blocks(tiny, gguf_tokenizer_path):
    path, _ = tiny["llama"]
    # the default KV dtype (bfloat16 where the CPU kernel reads it in place): keys rounded again at each of the
    # ~100 re-rotations stay usable; 450 tokens: far past max_model_len too
    llm = _llm(path, gguf_tokenizer_path, max_model_len=64, kv_cache_dtype="auto")
    captured = _capture_logits(llm)
    eng, kv = llm.engine, llm.engine.core.scheduler.kv
    eng.add_request("r", None, _sp(450), prompt_token_ids=_prompt(3, 12))
    final = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            final = out if out.finished else final
        assert kv.num_used_blocks <= MAX_BLOCKS
        for rid in eng.core.scheduler.requests:
            assert len(kv.block_ids(rid)) <= MAX_BLOCKS
    assert final is not None and len(final.outputs[0].token_ids) == 450
    assert final.outputs[0].finish_reason == "length"
    logits = torch.cat(captured)
    assert logits.shape[0] == 450 and torch.isfinite(logits).all()
    assert len(set(final.outputs[0].token_ids[-100:])) > 1  # still producing varied tokens
    assert kv.num_used_blocks == 0 and not eng.core.scheduler.streaming.evicted


@pytest.mark.slow
@torch.no_grad()
def test_preempted_streaming_request_resumes_from_sinks_and_window(tiny, gguf_tokenizer_path):
    """After evictions a preempted streaming request resumes by recomputing its sink + window token ids at
    positions 0..n-1: its logits then equal a plain transformers forward over exactly those ids."""
    path, hf = tiny["llama"]
    # 20 usable blocks: the normal request (earlier arrival) grows to 17, the streaming one holds up to 10
    llm = _llm(path, gguf_tokenizer_path, num_kv_blocks=21, enable_prefix_caching=False)
    captured = _capture_logits(llm)
    eng, core = llm.engine, llm.engine.core
    eng.add_request("hog", None, _sp(60, False), prompt_token_ids=_prompt(4, 8))
    eng.add_request("s", None, _sp(80), prompt_token_ids=_prompt(5, 19))
    hog, req = sorted(core.scheduler.requests.values(), key=lambda r: r.num_prompt_tokens)
    resumed = False
    while core.has_work():
        sched, n_logits = core.scheduler.schedule(), len(captured)
        core.scheduler.update_from_output(sched, core.runner.execute_model(sched))
        assert len(core.scheduler.kv.block_ids(req.request_id)) <= MAX_BLOCKS
        if req.num_preemptions and not resumed and any(n.req_id == req.request_id for n in sched.scheduled_new_reqs):
            resumed = True
            e = core.runner.states[req.request_id].num_evicted_tokens
            ctx = req.all_token_ids[:-1]  # the last token was sampled in this step
            kept = ctx[:SINK] + ctx[SINK + e:]
            assert e > 0 and sched.num_scheduled_tokens[req.request_id] == len(kept) <= MAX_CACHE
            assert len(captured) == n_logits + 1 and captured[-1].shape[0] == 1
            ref = hf(torch.tensor([kept])).logits[0, -1]
            assert (captured[-1][0] - ref).abs().max().item() < 1e-3
    assert resumed and core.scheduler.num_preemptions > 0
    assert req.num_output_tokens == 80 and hog.num_output_tokens == 60
    assert core.scheduler.kv.num_used_blocks == 0 and not core.scheduler.streaming.evicted


def test_bad_input_is_refused(tiny, gguf_tokenizer_path):
    path, _ = tiny["llama"]
    llm = _llm(path, gguf_tokenizer_path)
    with pytest.raises(PromptTooLongError) as exc:
        llm.generate([{"prompt_token_ids": _prompt(6, SINK + WINDOW + 1)}], _sp(4), use_tqdm=False)
    assert "streaming" in str(exc.value) and "\n" not in str(exc.value)
    _greedy(llm, [_prompt(6, SINK + WINDOW)], [_sp(2)])  # exactly sinks + window is fine
    with pytest.raises(InvalidRequestError, match="kv_eviction") as exc:
        SamplingParams(kv_eviction="h2o")
    assert "\n" not in str(exc.value)
    int8 = _llm(path, gguf_tokenizer_path, kv_cache_dtype="int8")
    with pytest.raises(InvalidRequestError, match="plain KV cache"):
        int8.generate([{"prompt_token_ids": _prompt(7, 5)}], _sp(4), use_tqdm=False)


def test_openai_extra_body_field():
    from tokenmill.server.protocol import CompletionRequest

    req = CompletionRequest(model="m", prompt="hi", kv_eviction="streaming")
    assert req.to_sampling_params().kv_eviction == "streaming"
    assert CompletionRequest(model="m", prompt="hi").to_sampling_params().kv_eviction is None
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest(model="m", prompt="hi", kv_eviction="h2o")
