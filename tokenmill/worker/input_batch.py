"""Persistent per-request state on the runner side, and the step's flat ForwardBatch built from it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tokenmill.core.outputs import SchedulerOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.forward_batch import ForwardBatch
from tokenmill.worker.streaming import cache_span


@dataclass
class RunnerRequestState:
    req_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # prompt + outputs known to the runner
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    num_prompt_tokens: int = 0
    # kv_eviction="streaming": sinks and text tokens evicted so far (cache position = text index - evicted)
    num_sink_tokens: int = 0
    num_evicted_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()  # banned (with stop ids) while output < min_tokens
    lora_int_id: int = 0  # its LoRA adapter (0: the base model)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class StepPlan:
    """What one step computes, per request in batch order."""

    req_ids: list[str]
    batch: ForwardBatch
    # per request: index range into the logits rows (start, count); count 0 = no logits needed
    logits_rows: list[tuple[int, int]]
    sample: list[bool]  # whether the request samples a token this step
    spec_tokens: list[list[int]]
    prompt_logprob_starts: list[Optional[int]]  # first position whose prediction the rows give


def update_states(states: dict[str, RunnerRequestState], sched: SchedulerOutput) -> None:
    """Apply the scheduler's diff to the runner's persistent state."""
    for rid in sched.finished_req_ids:
        states.pop(rid, None)
    for new in sched.scheduled_new_reqs:
        states[new.req_id] = RunnerRequestState(
            new.req_id, new.prompt_token_ids, list(new.prompt_token_ids) + list(new.output_token_ids),
            new.sampling_params, list(new.block_ids), new.num_computed_tokens, len(new.prompt_token_ids),
            eos_token_ids=tuple(new.eos_token_ids), lora_int_id=new.lora_int_id)
    for cached in sched.scheduled_cached_reqs:
        st = states[cached.req_id]
        st.block_ids.extend(cached.new_block_ids)
        st.num_computed_tokens = cached.num_computed_tokens
        st.token_ids.extend(sched.forced_token_ids.get(cached.req_id, ()))  # grammar jump-forward


def plan_step(states: dict[str, RunnerRequestState], sched: SchedulerOutput, block_size: int,
              device: torch.device) -> StepPlan:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qsl = [0]
    seq_lens: list[int] = []
    q_lens: list[int] = []
    logits_idx: list[int] = []
    logits_rows, sample, spec_all, plp_starts, req_ids, tables = [], [], [], [], [], []
    for rid, n in sched.num_scheduled_tokens.items():
        st = states[rid]
        spec = sched.scheduled_spec_decode_tokens.get(rid, [])
        start = st.num_computed_tokens
        cstart, toks, end = cache_span(st, start, n - len(spec))  # cache positions: streaming evictions
        toks = toks + spec
        input_ids.extend(toks)
        positions.extend(range(cstart, cstart + n))
        bids = st.block_ids
        slots.extend(bids[p // block_size] * block_size + p % block_size for p in range(cstart, cstart + n))
        tok0 = qsl[-1]
        qsl.append(tok0 + n)
        seq_lens.append(cstart + n)
        q_lens.append(n)
        does_sample = end >= len(st.token_ids)
        wants_plp = (st.params.prompt_logprobs is not None and start < st.num_prompt_tokens
                     and not st.num_evicted_tokens)
        row0 = len(logits_idx)
        if wants_plp:
            # every row of the chunk: row k predicts position start + k + 1
            logits_idx.extend(range(tok0, tok0 + n))
            plp_starts.append(start)
            nrows = n
        elif does_sample:
            k = len(spec) + 1
            logits_idx.extend(range(tok0 + n - k, tok0 + n))
            plp_starts.append(None)
            nrows = k
        else:
            plp_starts.append(None)
            nrows = 0
        logits_rows.append((row0, nrows))
        sample.append(does_sample)
        spec_all.append(spec)
        req_ids.append(rid)
        tables.append(bids)
    max_blocks = max(len(t) for t in tables)
    bt = torch.zeros((len(tables), max_blocks), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    nb = device.type != "cpu"
    batch = ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long).to(device, non_blocking=nb),
        positions=torch.tensor(positions, dtype=torch.long).to(device, non_blocking=nb),
        slot_mapping=torch.tensor(slots, dtype=torch.long).to(device, non_blocking=nb),
        block_tables=bt.to(device, non_blocking=nb),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device, non_blocking=nb),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32).to(device, non_blocking=nb),
        logits_indices=torch.tensor(logits_idx, dtype=torch.long).to(device, non_blocking=nb),
        seq_lens_cpu=seq_lens, query_lens_cpu=q_lens, block_size=block_size)
    return StepPlan(req_ids, batch, logits_rows, sample, spec_all, plp_starts)
