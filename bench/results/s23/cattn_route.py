"""PYTHONPATH=TREE python cattn_route.py [MODEL DTYPE]: which attention path a 2 x 200-token prefill step takes in the engine (counts calls per function)."""
import sys, collections
import torch
import tokenmill.ops.attention.backend as B
from tokenmill.engine.llm import LLM
from tokenmill.sampling_params import SamplingParams
calls = collections.Counter()
def wrap(name):
    f = getattr(B, name)
    def g(*a, **k):
        calls[name] += 1
        return f(*a, **k)
    setattr(B, name, g)
for n in ("cpu_prefill_attention", "paged_attention", "cpu_paged_attention"):
    wrap(n)
kw = {"model": sys.argv[1], "dtype": sys.argv[2]} if len(sys.argv) > 1 else {}
llm = LLM(enable_prefix_caching=False, num_threads=2, **kw)
runner = llm.engine.core.runner if hasattr(llm, "engine") else None
prompts = [{"prompt_token_ids": list(range(100 + i, 300 + i))} for i in range(2)]
out = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3))
print(sys.argv[1:] or "default GGUF", dict(calls))
