"""Accuracy of the int8 panels (gemm_dtype int8) against the bf16 panels (bfloat16) and the exact float32 GEMMs on the
bundled SmolLM2 Q4_1 GGUF: per prompt position of a 300-token prefill, |logprob of the actual next token - float32's|
(mean, max) and top-1 agreement; greedy continuations of 5 chat prompts decoded together (5-row steps, so the
panels run) compared token by token with float32's and bfloat16's.

    PYTHONPATH=. python bench/i8_accuracy.py
"""
from __future__ import annotations

from tokenmill import LLM, SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
             "Explain photosynthesis in one sentence.", "Count from one to ten."]
TEXT = " ".join(f"Sentence {i}: the quick brown fox jumps over the lazy dog near river {i}." for i in range(30))


def run(gemm: str):
    llm = LLM(max_model_len=1024, enable_prefix_caching=False, gemm_dtype=gemm)
    prompt = llm.get_tokenizer().encode(TEXT)[:300]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5), use_tqdm=False)[0]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    greedy = [o.outputs[0].token_ids for o in llm.chat(msgs, params, use_tqdm=False)]
    return out.prompt_logprobs[1:], greedy


def first_diff(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    res = {g: run(g) for g in ("float32", "bfloat16", "int8")}
    ref, ref_greedy = res["float32"]
    for g in ("bfloat16", "int8"):
        lp, greedy = res[g]
        d = [abs(a.logprob - b.logprob) for a, b in zip(ref, lp)]
        agree = sum(a.top[0][0] == b.top[0][0] for a, b in zip(ref, lp)) / len(ref)
        print(f"{g:>9}: prefill logprob |diff| vs float32 mean {sum(d) / len(d):.4f} max {max(d):.4f}, "
              f"top-1 agreement {agree:.3f}; greedy 64 tokens x 5: first differing token vs float32 "
              f"{[first_diff(a, b) for a, b in zip(ref_greedy, greedy)]}, vs bfloat16 "
              f"{[first_diff(a, b) for a, b in zip(res['bfloat16'][1], greedy)]}")


if __name__ == "__main__":
    main()
