"""`step_trace`: one JSON line per engine step, the shapes the cost model prices."""
from __future__ import annotations

import json

import pytest

from tests.model.tiny_models import save_tiny_model
from tokenmill.engine.llm import LLM
from tokenmill.errors import ConfigError
from tokenmill.perf.cost_model import StepShape
from tokenmill.sampling_params import SamplingParams


def test_step_trace_records_every_step_shape(tmp_path, gguf_tokenizer_path):
    path = save_tiny_model("llama", str(tmp_path / "m"))
    trace = tmp_path / "steps.jsonl"
    llm = LLM(path, tokenizer=gguf_tokenizer_path, dtype="float32", max_num_batched_tokens=16,
              enable_prefix_caching=False, step_trace=str(trace))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([{"prompt_token_ids": list(range(5, 25))}, {"prompt_token_ids": list(range(30, 36))}], params,
                 use_tqdm=False)
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert rows and all(r["s"] > 0 and r["t"] > 1e9 for r in rows)
    assert all(r["tokens"] <= 16 for r in rows)
    # 20 + 6 prompt tokens, then 4 tokens each of which the last is sampled but never fed back: 3 decodes each
    assert sum(r["tokens"] for r in rows) == 26 + 2 * 3
    # the first step: a 16-token chunk of the first prompt (budget 16), the shape the cost model prices
    first = StepShape.of([(0, 16)])
    assert (rows[0]["tokens"], rows[0]["reqs"], rows[0]["kv"], rows[0]["pairs"]) == (
        first.num_tokens, first.num_reqs, first.kv_tokens_read, first.attn_pairs)
    assert rows[-1]["tokens"] == rows[-1]["reqs"]  # the last steps decode


def test_step_trace_bad_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="step_trace"):
        LLM(str(tmp_path), step_trace=str(tmp_path / "missing" / "steps.jsonl"))
    with pytest.raises(ConfigError, match="step_trace"):
        LLM(str(tmp_path), step_trace=str(tmp_path))
