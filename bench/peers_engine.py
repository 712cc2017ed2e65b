"""tokenmill as a plug-in engine for the CPU peer harness (/work/shared/bench/cpu_peers/peers_bench.py).

    python peers_bench.py run --engine /path/to/bench/peers_engine.py:TokenmillEngine \
        --engine-arg dtype=bfloat16 --model $M --threads 2 --out results/tokenmill.json

Every --engine-arg key=value is a tokenmill engine argument (any field of tokenmill.config: dtype,
max_num_batched_tokens, max_num_seqs, block_size, ...). Prefix caching is OFF by default here, like
llama-server's `cache_prompt: false` in the harness, so repeated latency runs really prefill.

The engine is driven through LLMEngine.step() directly, so `on_token` fires as each token leaves a step.
Greedy; with ignore_eos the harness's stop ids are banned through min_tokens (= max_tokens) plus
stop_token_ids, the same mechanism as transformers' min_new_tokens.
"""
from __future__ import annotations

import itertools
import os
import sys
from typing import Any, Callable, Optional, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # importable from any working directory
    sys.path.insert(0, _ROOT)


class TokenmillEngine:
    name = "tokenmill"

    def __init__(self, **engine_args: Any):
        self.engine_args = {"enable_prefix_caching": False, **engine_args}
        self.engine = None
        self._ids = itertools.count()

    def load(self, model_path: str, threads: int) -> None:
        from tokenmill.config import EngineConfig
        from tokenmill.engine.llm_engine import LLMEngine

        args = {"num_threads": threads, **self.engine_args}
        self.engine = LLMEngine.from_config(EngineConfig.from_kwargs(model=model_path, **args))

    def info(self) -> dict:
        import torch

        import tokenmill

        r = self.engine.core.runner
        return {"tokenmill": getattr(tokenmill, "__version__", "dev"), "torch": torch.__version__,
                "dtype": str(r.dtype), "threads": torch.get_num_threads(), "engine_args": self.engine_args,
                "kv_blocks": r.num_blocks}

    def _params(self, n: int, stop_ids: Sequence[int], ignore_eos: bool):
        from tokenmill.sampling_params import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n if ignore_eos else 0,
                              stop_token_ids=list(stop_ids), ignore_eos=ignore_eos, skip_special_tokens=False)

    def _run(self, prompts: Sequence[Sequence[int]], n: int, stop_ids: Sequence[int], ignore_eos: bool,
             on_token: Optional[Callable[[int], None]] = None) -> list[list[int]]:
        eng = self.engine
        params = self._params(n, stop_ids, ignore_eos)
        order = {}
        for p in prompts:
            rid = f"b{next(self._ids)}"
            order[rid] = len(order)
            eng.add_request(rid, None, params, prompt_token_ids=list(p))
        out: list[list[int]] = [[] for _ in prompts]
        stops = set(stop_ids)
        while eng.has_unfinished_requests():
            for ro in eng.step():
                c = ro.outputs[0]
                if on_token is not None:
                    for t in c.delta_token_ids:
                        if ignore_eos or t not in stops:
                            on_token(t)
                if ro.finished:
                    toks = list(c.token_ids)
                    if not ignore_eos and toks and toks[-1] in stops:
                        toks.pop()  # the harness wants the stop id left out
                    out[order[ro.request_id]] = toks
        return out

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int], ignore_eos: bool,
                 on_token: Optional[Callable[[int], None]] = None) -> list[int]:
        return self._run([prompt_ids], max_new_tokens, stop_ids, ignore_eos, on_token)[0]

    def generate_batch(self, prompts, max_new_tokens, stop_ids, ignore_eos) -> list[list[int]]:
        return self._run(prompts, max_new_tokens, stop_ids, ignore_eos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.engine.tokenizer.decode(list(ids), skip_special_tokens=True)

    def peak_rss_bytes(self):
        return None

    def prepare_concurrency(self, n: int) -> None:
        pass

    def close(self) -> None:
        self.engine = None
