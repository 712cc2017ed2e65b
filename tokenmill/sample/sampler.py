"""The sampler: logits [B, V] -> one token id per row (vLLM v1 semantics).

Order: logit_bias -> min_tokens ban -> repetition penalty -> presence/frequency penalties ->
(greedy rows: argmax) -> temperature -> min_p -> top_k -> top_p -> inverse-CDF sampling (a uniform per row).
On the CPU the last five run fused per row in C (tokenmill/ops/cpu/sampler.py; the PyTorch path is its reference).
Logprobs are those of the raw model distribution (log_softmax of the unprocessed logits).
The only device -> host transfer is the final `.tolist()` of token ids (and logprobs when asked).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from tokenmill.core.outputs import Logprob
from tokenmill.sample.logits_processors import (apply_penalties_and_bias, apply_sampling_filters,
                                                draw_uniforms, inverse_cdf, needs_penalties_or_bias,
                                                row_argmax)
from tokenmill.ops.cpu.sampler import sample_rows as cpu_sample_rows
from tokenmill.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
# rows of log_softmax computed at once in compute_logprobs (bounds memory for long prompts)
_LOGPROB_CHUNK = 1024


@dataclass
class SamplingBatch:
    """Per-row inputs of one sampling step (one row per logits row)."""

    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]  # generated so far (penalties, min_tokens)
    eos_token_ids: list[tuple[int, ...]]  # banned (with stop_token_ids) while len(output) < min_tokens
    generators: list[Optional[torch.Generator]]  # per-row RNG for seeded requests; None = default


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Optional[Logprob]]  # per row; None unless params.logprobs is not None


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def make_request_generator(seed: int, step: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A generator seeded from (request seed, output position): same stream for the same pair,
    whatever the batch, the step it is sampled in, or a preemption in between."""
    mixed = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return torch.Generator(device=device).manual_seed(mixed)


def logprob_tensors(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw logprobs of logits [N, V] for token_ids [N]: (token logprob [N], 1-based rank [N],
    top-num_top logprobs [N, num_top] descending, their ids [N, num_top]). Stays on the device."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    tok_lp = lp.gather(1, token_ids[:, None])  # [N, 1]
    rank = (lp > tok_lp).sum(dim=-1) + 1  # [N]
    top_lp, top_ids = lp.topk(num_top, dim=-1) if num_top > 0 else (lp[:, :0], token_ids[:, None][:, :0])
    return tok_lp.squeeze(1), rank, top_lp, top_ids


def _to_logprob_objects(tensors: tuple[torch.Tensor, ...], token_ids: Sequence[int],
                        num_tops: Sequence[int]) -> list[Logprob]:
    tok_lp, rank, top_lp, top_ids = (t.tolist() for t in tensors)
    return [Logprob(token_id=int(t), logprob=tok_lp[i], rank=rank[i],
                    top=list(zip(top_ids[i][:n], top_lp[i][:n])))
            for i, (t, n) in enumerate(zip(token_ids, num_tops))]


class Sampler:
    """Picks one token per logits row; see the module docstring for the order of operations."""

    def __init__(self, seed: int = 0, device: Union[str, torch.device] = "cpu", fused_cpu: bool = True):
        """fused_cpu: on a CPU device, stage 2 and the draw run fused per row in C (tokenmill/ops/cpu/sampler.py,
        no sort of the vocabulary) where the kernel builds; False keeps the PyTorch reference."""
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.fused_cpu = fused_cpu and self.device.type == "cpu"

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [B, V] (float32) -> SamplerOutput with B token ids."""
        params = batch.params
        B, V = logits.shape
        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        stage1 = needs_penalties_or_bias(params, batch.output_token_ids, batch.eos_token_ids)
        all_greedy = all(p.greedy for p in params)
        if all_greedy and not stage1 and not want_lp:
            return SamplerOutput(row_argmax(logits).tolist(), [None] * B)  # fast path

        raw = logits.float()
        x = raw.clone()
        if stage1:
            x = apply_penalties_and_bias(x, params, batch.prompt_token_ids, batch.output_token_ids,
                                         batch.eos_token_ids)
        if all_greedy:
            tokens = row_argmax(x)  # [B]
        else:
            greedy = [p.greedy for p in params]
            greedy_tokens = row_argmax(x) if any(greedy) else None
            gens = [None if p.greedy else g for p, g in zip(params, batch.generators)]
            u = draw_uniforms(B, gens, self.generator, x.device)
            tokens = cpu_sample_rows(x, params, u) if self.fused_cpu else None  # greedy rows -1: replaced below
            if tokens is None:
                tokens = inverse_cdf(apply_sampling_filters(x, params).softmax(dim=-1), u)
            if greedy_tokens is not None:
                tokens = torch.where(torch.tensor(greedy, device=logits.device), greedy_tokens, tokens)

        lp_tensors = None
        if want_lp:
            idx = torch.tensor(want_lp, device=logits.device)
            num_tops = [params[i].logprobs for i in want_lp]
            lp_tensors = logprob_tensors(raw[idx], tokens[idx], max(num_tops))
        token_list = tokens.tolist()
        out_lp: list[Optional[Logprob]] = [None] * B
        if lp_tensors is not None:
            objs = _to_logprob_objects(lp_tensors, [token_list[i] for i in want_lp], num_tops)
            for i, o in zip(want_lp, objs):
                out_lp[i] = o
        return SamplerOutput(token_list, out_lp)

    def compute_logprobs(self, logits: torch.Tensor, token_ids: Union[torch.Tensor, Sequence[int]],
                         num_top: Union[int, Sequence[int]]) -> list[Logprob]:
        """Raw-distribution Logprob of token_ids[i] under logits[i] (e.g. prompt_logprobs), with the
        top num_top (an int for all rows, or one per row) alternatives, descending."""
        n = logits.shape[0]
        tops = [num_top] * n if isinstance(num_top, int) else list(num_top)
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device).reshape(n)
        id_list = ids.tolist() if not isinstance(token_ids, (list, tuple)) else list(token_ids)
        result: list[Logprob] = []
        for s in range(0, n, _LOGPROB_CHUNK):
            e = min(n, s + _LOGPROB_CHUNK)
            t = logprob_tensors(logits[s:e], ids[s:e], max(tops[s:e]))
            result.extend(_to_logprob_objects(t, id_list[s:e], tops[s:e]))
        return result
