"""Rejection sampling for speculative decoding with one-hot (n-gram) drafts.

Draft token d_j is accepted with probability p_j(d_j) (the draft distribution is one-hot, so
min(1, p/q) = p). At the first rejection the token is drawn from normalize(max(p_j - onehot(d_j), 0));
when every draft is accepted a bonus token is drawn from p_K. The emitted tokens are then distributed
exactly as tokens sampled one at a time from the target. Greedy requests accept while d_j == argmax p_j.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from tokenmill.sample.logits_processors import (row_argmax, apply_penalties_and_bias, apply_sampling_filters, inverse_cdf,
                                                needs_penalties_or_bias)
from tokenmill.sampling_params import SamplingParams


def _emit(draft: torch.Tensor, accept: torch.Tensor, recovered: torch.Tensor) -> torch.Tensor:
    """draft [N, K], accept [N, K] bool, recovered [N, K+1] -> tokens [N, K+1], -1 after the last one."""
    N, K = draft.shape
    n_acc = accept.long().cumprod(dim=1).sum(dim=1, keepdim=True)  # [N, 1] leading accepts
    pos = torch.arange(K + 1, device=draft.device)[None, :]  # [1, K+1]
    draft_pad = torch.cat([draft, draft.new_zeros(N, 1)], dim=1)  # [N, K+1]
    out = torch.where(pos == n_acc, recovered, torch.full_like(recovered, -1))
    return torch.where(pos < n_acc, draft_pad, out)


def rejection_sample_probs(probs: torch.Tensor, draft: torch.Tensor,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Batched core. probs [N, K+1, V] target distributions, draft [N, K] -> tokens [N, K+1]
    (accepted drafts, then one recovered/bonus token, then -1 padding)."""
    N, K1, V = probs.shape
    K = K1 - 1
    p_draft = probs[:, :K].gather(2, draft[:, :, None]).squeeze(2)  # [N, K]
    u = torch.rand(N, K, generator=generator, device=probs.device, dtype=probs.dtype)
    accept = u < p_draft  # [N, K]
    resid = probs.clone()
    resid[:, :K].scatter_(2, draft[:, :, None], 0.0)  # max(p - onehot(d), 0) up to normalization
    empty = resid.sum(dim=2, keepdim=True) <= 0  # only if p(d) == 1, where rejection cannot happen
    resid = torch.where(empty, probs, resid)
    u = torch.rand(N * K1, generator=generator, device=probs.device, dtype=torch.float64)
    recovered = inverse_cdf(resid.reshape(N * K1, V), u).reshape(N, K1)  # unnormalized mass is fine
    return _emit(draft, accept, recovered)


def rejection_sample_greedy(target_tokens: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """target_tokens [N, K+1] (argmax per position), draft [N, K] -> tokens [N, K+1] as above."""
    return _emit(draft, draft == target_tokens[:, :-1], target_tokens)


def target_logits_processed(target_logits: torch.Tensor, draft_token_ids: Sequence[int],
                            params: SamplingParams, prompt_token_ids: Sequence[int] = (),
                            output_token_ids: Sequence[int] = (),
                            eos_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """Stage-1 processing (bias, min_tokens, penalties) of target_logits [K+1, V]; position j sees
    output_token_ids + draft[:j] as its history."""
    K1 = target_logits.shape[0]
    outs = [list(output_token_ids) + list(draft_token_ids[:j]) for j in range(K1)]
    ps, prompts, eos = [params] * K1, [list(prompt_token_ids)] * K1, [tuple(eos_token_ids)] * K1
    x = target_logits.float().clone()
    if needs_penalties_or_bias(ps, outs, eos):
        x = apply_penalties_and_bias(x, ps, prompts, outs, eos)
    return x


def rejection_sample(target_logits: torch.Tensor, draft_token_ids: Sequence[int], params: SamplingParams,
                     generator: Optional[torch.Generator] = None, *, prompt_token_ids: Sequence[int] = (),
                     output_token_ids: Sequence[int] = (), eos_token_ids: Sequence[int] = ()) -> list[int]:
    """Verify K draft tokens of one request against target_logits [K+1, V] (raw model logits).

    Returns the accepted draft prefix plus one recovered (or bonus) token: 1..K+1 ids.
    The optional histories let penalties, logit_bias and min_tokens apply as in the plain sampler.
    """
    K = len(draft_token_ids)
    if target_logits.shape[0] != K + 1:
        raise ValueError(f"target_logits has {target_logits.shape[0]} rows, expected {K + 1}")
    x = target_logits_processed(target_logits, draft_token_ids, params, prompt_token_ids,
                                output_token_ids, eos_token_ids)
    draft = torch.tensor(list(draft_token_ids), dtype=torch.long, device=x.device)[None, :]  # [1, K]
    if params.greedy:
        out = rejection_sample_greedy(row_argmax(x)[None, :], draft)
    else:
        probs = apply_sampling_filters(x, [params] * (K + 1)).softmax(dim=-1)  # [K+1, V]
        out = rejection_sample_probs(probs[None], draft, generator)
    return [t for t in out[0].tolist() if t >= 0]
