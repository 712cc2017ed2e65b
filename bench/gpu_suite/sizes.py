"""Workload sizes of the suite: FULL for the device run (H100, under 9 minutes in all), DRY for the CPU dry run.

Each size is chosen so its step ends well inside its time limit (bench/gpu_suite.sh) on an H100:
- batch-1 decode 128/256: ~1.5 s at the 187 tok/s roofline.
- offline 512 x (512 in, 256 out): ~10 s at the ~12.9k tok/s workload roofline, ~50 s at 2.5k tok/s.
  All 512 requests stay resident: 512 x 768 tokens x 128 KiB = 48 GiB of KV on an 80 GB card.
- 32k context: one 32,768-token prefill (~1-5 s), then 128 decode steps at ~6.8 ms.
- FP8 KV: both caches get the memory of 32,768 bf16 tokens (4 GiB on the 8B shape), so 192 requests of
  768 tokens are memory-bound (bf16 holds ~42 at full length, fp8 ~85).
- prefix caching: 64 requests sharing a 2,000-token prefix, each with a 200-token question, 64 out.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    batch1_prompt: int
    batch1_new: int
    offline_requests: int
    offline_prompt: int
    offline_new: int
    offline_max_seqs: int
    max_batched_tokens: int
    long_context: int
    long_new: int
    fp8_kv_tokens: int  # both KV caches get the memory of this many tokens in the model dtype
    fp8_requests: int
    fp8_prompt: int
    fp8_new: int
    prefix_requests: int
    prefix_len: int
    question_len: int
    prefix_new: int
    eq_prompt_lens: tuple[int, ...]
    eq_new: int
    eq_min_match: int  # greedy tokens must agree at least this far
    eq_tie_tol: float  # a later divergence is allowed only where the top-2 logits are this close
    peer_b1_prompt: int
    peer_b1_new: int
    peer_requests: int
    peer_prompt: int
    peer_new: int
    peer_hf_batch: int
    hf8b_prompt: int
    hf8b_new: int

    @property
    def offline_max_model_len(self) -> int:
        return _round_up(max(self.offline_prompt + self.offline_new, self.batch1_prompt + self.batch1_new), 64)

    @property
    def long_max_model_len(self) -> int:
        return _round_up(self.long_context + self.long_new, 64)

    @property
    def fp8_max_model_len(self) -> int:
        return _round_up(self.fp8_prompt + self.fp8_new, 64)

    @property
    def prefix_max_model_len(self) -> int:
        return _round_up(self.prefix_len + self.question_len + self.prefix_new, 64)

    @property
    def peer_max_model_len(self) -> int:
        return _round_up(max(self.peer_prompt + self.peer_new, self.peer_b1_prompt + self.peer_b1_new), 64)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


FULL = Sizes(batch1_prompt=128, batch1_new=256, offline_requests=512, offline_prompt=512, offline_new=256,
             offline_max_seqs=512, max_batched_tokens=8192, long_context=32768, long_new=128,
             fp8_kv_tokens=32768, fp8_requests=192, fp8_prompt=512, fp8_new=256,
             prefix_requests=64, prefix_len=2000, question_len=200, prefix_new=64,
             eq_prompt_lens=(24, 61, 130, 257), eq_new=64, eq_min_match=32, eq_tie_tol=1e-2,
             peer_b1_prompt=128, peer_b1_new=256, peer_requests=128, peer_prompt=512, peer_new=256,
             peer_hf_batch=128, hf8b_prompt=128, hf8b_new=256)

DRY = Sizes(batch1_prompt=16, batch1_new=24, offline_requests=16, offline_prompt=32, offline_new=16,
            offline_max_seqs=16, max_batched_tokens=256, long_context=600, long_new=8,
            fp8_kv_tokens=160, fp8_requests=12, fp8_prompt=32, fp8_new=16,
            prefix_requests=6, prefix_len=128, question_len=16, prefix_new=8,
            eq_prompt_lens=(5, 17, 40), eq_new=40, eq_min_match=32, eq_tie_tol=1e-2,
            peer_b1_prompt=16, peer_b1_new=16, peer_requests=8, peer_prompt=32, peer_new=16,
            peer_hf_batch=8, hf8b_prompt=16, hf8b_new=16)


def sizes_for(dry: bool) -> Sizes:
    return DRY if dry else FULL
