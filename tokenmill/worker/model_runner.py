"""Model runner: loads the model, sizes and allocates the KV cache, executes one scheduled step.

`__init__` touches no device; `load()` does the heavy work. `execute_model(SchedulerOutput)` returns
a ModelRunnerOutput: the only way results leave the device side.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import torch

from tokenmill.config import EngineConfig
from tokenmill.core.outputs import Logprob, ModelRunnerOutput, SchedulerOutput
from tokenmill.errors import ConfigError
from tokenmill.ops.attention.kv_quant import (QUANTIZED_KV_DTYPES, allocate_quantized_kv_cache,
                                             kv_bytes_per_token_per_layer, plain_kv_dtype, resolve_kv_cache_dtype)
from tokenmill.ops.attention.reference import allocate_kv_cache
from tokenmill.ops.cpu.attention import reads_kv_in_place
from tokenmill.sample.grammar_mask import apply_token_bitmask_
from tokenmill.sample.rejection import rejection_sample
from tokenmill.sample.sampler import Sampler, SamplingBatch, make_request_generator
from tokenmill.worker.device_setup import DeviceSetup
from tokenmill.worker.expert_offload import MoEStatsReader, install_expert_offload
from tokenmill.worker.input_batch import RunnerRequestState, StepPlan, plan_step, update_states
from tokenmill.worker.kv_offload import HostKVTier
from tokenmill.worker.streaming import apply_kv_streaming, find_rotary

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_CPU_KV_GIB = 1.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return _DTYPES[name]


class ModelRunner:
    def __init__(self, config: EngineConfig, tp=None):
        """tp: this rank's tokenmill.distributed.group.TPGroup (None: one rank); on CUDA a rank runs on
        cuda:tp.local_device."""
        self.config = config
        self.tp = tp
        self.device = resolve_device(config.model.device)
        if tp is not None and tp.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", tp.local_device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.block_size = config.cache.block_size
        self.model = None
        self.hf_config = None
        self.source = None
        self.kv_caches: list[torch.Tensor] = []
        self.kv_cache_dtype = ""  # kv_cache_dtype resolved at load(): float32, bfloat16, float16, int8 or fp8
        self.num_blocks = 0
        self.kv_offload: Optional[HostKVTier] = None  # the CPU offload tier (cpu_offload_gb > 0)
        self.kv_connector = None  # disaggregated prefill / decode: a worker/kv_connector.KVConnector (kv_role)
        self.moe_stats: Optional[MoEStatsReader] = None  # MoE models: routing counts for ModelRunnerOutput
        self.max_model_len = 0
        self.states: dict[str, RunnerRequestState] = {}
        self.sampler = Sampler(seed=config.model.seed, device=self.device)
        self.proposer = None
        self.load_time_s = 0.0
        self.lora = None  # tokenmill.lora.runtime.LoRARuntime (enable_lora)
        if config.lora.enable_lora and self.device.type == "cuda" and not config.model.enforce_eager:
            logger.info("enable_lora: CUDA graphs off (the LoRA hooks choose their work per step)")
            config.model.enforce_eager = True
        self.device_setup = DeviceSetup(config, self.device)  # attention backend, KV plan, graphs

    # ---- loading -------------------------------------------------------------------------------
    def load(self) -> None:
        from tokenmill.model.loader import cpu_packs_16bit, load_hf_config, load_model, resolve_model_source

        t0 = time.perf_counter()
        mc = self.config.model
        if mc.num_threads:
            torch.set_num_threads(mc.num_threads)
        self.source = resolve_model_source(mc.model)
        self.hf_config = load_hf_config(self.source)
        self._check_latent_kv()
        packed_16bit = (self.tp is None or self.tp.world_size == 1) and cpu_packs_16bit(
            self.source, self.dtype, self.device, mc.quantization, mc.gemm_dtype, mc.load_format)
        if packed_16bit:
            logger.info("dtype bfloat16 on this CPU (AMX or AVX512-BF16): the checkpoint's 16-bit weights stay "
                        "packed for the CPU kernels (bf16 tiles, the fused layer), float32 between them "
                        "(quantization none: the per-op bfloat16 model)")
            self.dtype = torch.float32
        self.model = load_model(self.source, self.hf_config, self.dtype, self.device, mc.load_format,
                                quantization=mc.quantization, gemm_dtype=mc.gemm_dtype, tp=self.tp,
                                expert_parallel=self.config.parallel.enable_expert_parallel,
                                expert_offload=mc.moe_expert_cache_gb is not None, packed_16bit=packed_16bit)
        self.device_setup.attach(self.model)
        if mc.moe_expert_cache_gb is not None:
            install_expert_offload(self.model, mc.moe_expert_cache_gb, mc.moe_expert_prefetch, self.device,
                                   self.tp)
        if self.config.lora.enable_lora:
            from tokenmill.lora.runtime import LoRARuntime

            lc = self.config.lora
            self.lora = LoRARuntime(self.model, lc.num_slots, lc.max_lora_rank, self.device, self.dtype)
        self.max_model_len = self._resolve_max_model_len()
        self.kv_cache_dtype = self._resolve_kv_cache_dtype()
        self._allocate_kv()
        self.kv_offload = HostKVTier.create(self.config.cache.cpu_offload_gb, self.kv_caches,
                                            self.kv_bytes_per_block(), self.device)
        self.device_setup.capture(self.kv_caches, self.max_model_len, self.block_size)
        from tokenmill.worker.kv_connector import make_kv_connector

        self.kv_connector = make_kv_connector(self.config, self.kv_caches, self.block_size, self.kv_cache_dtype)
        reset = getattr(self.model, "reset_expert_counts", None)
        if reset is not None:
            reset()  # MoE routing statistics start at serving, not at profiling / graph capture
        if getattr(self.model, "expert_offload", None) is not None:
            self.model.expert_offload.reset_stats()
        self.moe_stats = MoEStatsReader.create(self.model)  # routing statistics for /metrics (MoE models)
        if self.device.type == "cpu":
            from tokenmill.ops.cpu.host import freeze_startup_objects, tune_allocator

            tune_allocator()
            freeze_startup_objects()
        if self.config.spec.speculative_method == "ngram":
            from tokenmill.spec.ngram import NgramProposer

            sc = self.config.spec
            self.proposer = NgramProposer(sc.ngram_min, sc.ngram_max, sc.num_speculative_tokens)
        self.load_time_s = time.perf_counter() - t0

    def _check_latent_kv(self) -> None:
        """An MLA model (a compressed latent per token, tokenmill/model/layers/mla.py): tensor parallelism is not
        supported there yet (refused before any weight is read)."""
        from tokenmill.model.registry import get_model_class

        if not getattr(get_model_class(self.hf_config), "latent_kv_cache", False):
            return
        if self.tp is not None and self.tp.world_size > 1:
            raise ConfigError("tensor parallelism does not support MLA (DeepSeek) models yet; use "
                              "tensor_parallel_size 1", param="tensor_parallel_size")

    def model_info(self):
        """The load handshake (see tokenmill/executor/base.py)."""
        from tokenmill.engine.tokenizer import eos_token_ids
        from tokenmill.executor.base import ModelInfo

        vocab = int(getattr(self.model, "vocab_size", None) or self.hf_config.vocab_size)
        return ModelInfo(max_model_len=self.max_model_len, num_kv_blocks=self.num_blocks,
                         num_host_blocks=self.num_host_blocks, vocab_size=vocab,
                         eos_token_ids=eos_token_ids(None, self.hf_config),
                         supports_kv_streaming=self.supports_kv_streaming(), kv_cache_dtype=self.kv_cache_dtype,
                         model_path=self.source.path,
                         gguf_file=self.source.gguf_file, dtype=str(self.dtype).removeprefix("torch."),
                         device=str(self.device), load_time_s=self.load_time_s,
                         world_size=self.tp.world_size if self.tp is not None else 1,
                         lora_shapes=self.lora.shapes if self.lora is not None else None)

    def _resolve_max_model_len(self) -> int:
        limit = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        want = self.config.model.max_model_len
        if want is not None:
            if want > limit:
                raise ConfigError(f"max_model_len {want} exceeds the model's max_position_embeddings {limit}")
            return want
        return int(limit)

    @property
    def num_host_blocks(self) -> int:
        return self.kv_offload.num_host_blocks if self.kv_offload is not None else 0

    def _resolve_kv_cache_dtype(self) -> str:
        """kv_cache_dtype for this model, device and attention backend (auto: see resolve_kv_cache_dtype). MLA
        models attend in PyTorch (ops/attention/mla.py), not through the C kernel: no in-place bf16 read there."""
        bf16_in_place = (self.device_setup.backend_name == "cpu" and not getattr(self.model, "latent_kv_cache", False)
                         and reads_kv_in_place(torch.bfloat16, self.model.head_dim))
        return resolve_kv_cache_dtype(self.config.cache.kv_cache_dtype, self.dtype, self.device.type, bf16_in_place)

    def kv_bytes_per_block(self) -> int:
        """K + V bytes of one block over all layers, per-token scales of a quantized cache included."""
        m = self.model
        return m.num_layers * self.block_size * kv_bytes_per_token_per_layer(self.kv_cache_dtype, m.num_kv_heads,
                                                                             m.head_dim)

    def _allocate_kv(self) -> None:
        cc = self.config.cache
        per_block = self.kv_bytes_per_block()
        if cc.num_kv_blocks is not None:
            num_blocks = cc.num_kv_blocks
        else:
            if cc.kv_cache_memory is not None:
                budget = cc.kv_cache_memory * (1 << 30)
            elif self.device.type == "cuda":  # profile a peak forward, plan with memory_planner
                budget = self.device_setup.plan_kv_budget(self)
            else:
                budget = _DEFAULT_CPU_KV_GIB * (1 << 30)
            num_blocks = int(budget // per_block)
            # never more than every slot at full length needs (+1 for the null block)
            need = self.config.scheduler.max_num_seqs * -(-self.max_model_len // self.block_size) + 1
            num_blocks = min(num_blocks, need)
        if self.tp is not None and self.tp.world_size > 1:  # every rank must hold the same blocks
            num_blocks = self.tp.min_int(num_blocks, self.device)
        if num_blocks < 2:
            raise ConfigError(f"the KV cache gets {num_blocks} blocks of {per_block} bytes: too few; "
                              "raise kv_cache_memory / gpu_memory_utilization or num_kv_blocks")
        capacity = (num_blocks - 1) * self.block_size
        if capacity < self.max_model_len:
            if self.config.model.max_model_len is not None:
                raise ConfigError(f"max_model_len {self.max_model_len} does not fit in the KV cache "
                                  f"({capacity} tokens); lower max_model_len or raise kv_cache_memory")
            logger.warning("max_model_len lowered from %d to %d to fit the KV cache", self.max_model_len, capacity)
            self.max_model_len = capacity
        self.num_blocks = num_blocks
        m = self.model
        logger.info("KV cache: %d blocks of %d tokens, %s (kv_cache_dtype %s), %.3f GiB", num_blocks, self.block_size,
                    self.kv_cache_dtype, cc.kv_cache_dtype, num_blocks * per_block / (1 << 30))
        if self.kv_cache_dtype in QUANTIZED_KV_DTYPES:  # QuantizedKVCache: the attention backends dispatch on it
            self.kv_caches = allocate_quantized_kv_cache(m.num_layers, num_blocks, self.block_size,
                                                         m.num_kv_heads, m.head_dim, self.kv_cache_dtype, self.device)
            return
        self.kv_caches = allocate_kv_cache(m.num_layers, num_blocks, self.block_size, m.num_kv_heads, m.head_dim,
                                           plain_kv_dtype(self.kv_cache_dtype), self.device)

    def supports_kv_streaming(self) -> bool:
        """kv_eviction="streaming" re-rotates cached keys: it needs RoPE and an unquantized cache."""
        return (find_rotary(self.model) is not None and all(isinstance(c, torch.Tensor) for c in self.kv_caches)
                and not getattr(self.model, "latent_kv_cache", False))  # MLA rows are not per-head roped keys

    # ---- one step ------------------------------------------------------------------------------
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if sched.kv_transfer is None:
            return self._execute_model(sched)
        self.kv_connector.start_step(sched.kv_transfer)  # background transfers, overlapped with this step
        out = self._execute_model(sched)
        # a step with nothing to run waits a little for a transfer to finish instead of spinning
        out.kv_sent, out.kv_recved = self.kv_connector.get_finished(0.005 if sched.is_empty else 0.0)
        return out

    @torch.inference_mode()
    def _execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        update_states(self.states, sched)
        if sched.kv_swap_out or sched.kv_swap_in:  # before the forward: it may overwrite swapped-out blocks
            self.kv_offload.apply(sched.kv_swap_out, sched.kv_swap_in)
        if sched.kv_streaming:  # evictions of kv_eviction="streaming" requests: block tables + K-shift
            apply_kv_streaming(self.states, sched, self.kv_caches, find_rotary(self.model), self.block_size)
        if sched.lora_unloads or sched.lora_loads:
            for lid in sched.lora_unloads:
                self.lora.unload(lid)
            for lid, weights in sched.lora_loads.items():
                self.lora.load(lid, weights)
        if sched.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput()
        if self.lora is not None:  # requests of one adapter adjacent: each adapter's rows are one contiguous slice
            order = sorted(sched.num_scheduled_tokens.items(), key=lambda kv: self.states[kv[0]].lora_int_id)
            sched = dataclasses.replace(sched, num_scheduled_tokens=dict(order))
        plan = plan_step(self.states, sched, self.block_size, self.device)
        b = plan.batch
        if self.lora is None:
            hidden = self.device_setup.forward(b)  # [T, hidden]: a CUDA graph replay or the eager forward
        else:
            self.lora.begin_step([self.states[r].lora_int_id for r in plan.req_ids], b.query_lens_cpu)
            try:
                hidden = self.device_setup.forward(b)
            finally:
                self.lora.end_step()
        logits = self.model.compute_logits(hidden.index_select(0, b.logits_indices)) if b.logits_indices.numel() \
            else None  # [N, vocab]
        if sched.grammar_rows and logits is not None:
            self._apply_grammar(plan, sched, logits)
        out = self._sample(plan, logits)
        if self.moe_stats is not None:
            out.moe_stats = self.moe_stats.read()
        return out

    def _apply_grammar(self, plan: StepPlan, sched: SchedulerOutput, logits: torch.Tensor) -> None:
        """Constrained decoding: mask, in place, the logits rows a constrained request samples or verifies
        (its last 1 + len(spec) rows) with its grammar bitmask rows."""
        logit_rows: list[int] = []
        mask_rows: list[int] = []
        for i, rid in enumerate(plan.req_ids):
            g0 = sched.grammar_rows.get(rid)
            if g0 is None or not plan.sample[i]:
                continue
            row0, nrows = plan.logits_rows[i]
            k1 = len(plan.spec_tokens[i]) + 1
            logit_rows.extend(range(row0 + nrows - k1, row0 + nrows))
            mask_rows.extend(range(g0, g0 + k1))
        if logit_rows:
            bm = sched.grammar_bitmask
            apply_token_bitmask_(logits, bm if mask_rows == list(range(len(bm))) else bm[mask_rows], logit_rows)

    def _sample(self, plan: StepPlan, logits: Optional[torch.Tensor]) -> ModelRunnerOutput:
        out = ModelRunnerOutput(req_ids=plan.req_ids)
        out.sampled_token_ids = [[] for _ in plan.req_ids]
        out.logprobs = [None for _ in plan.req_ids]
        rows, reqs = [], []  # plain sampling rows (no speculation)
        for i, rid in enumerate(plan.req_ids):
            st = self.states[rid]
            row0, nrows = plan.logits_rows[i]
            if plan.prompt_logprob_starts[i] is not None:
                out.prompt_logprobs[rid] = self._prompt_logprobs(st, plan.prompt_logprob_starts[i],
                                                                 logits[row0:row0 + nrows])
            if not plan.sample[i]:
                continue
            if plan.spec_tokens[i]:
                k = len(plan.spec_tokens[i])
                gen = self._generator(st)
                toks = rejection_sample(logits[row0 + nrows - k - 1:row0 + nrows], plan.spec_tokens[i], st.params, gen)
                out.sampled_token_ids[i] = toks
                if st.params.logprobs is not None:
                    r = logits[row0 + nrows - k - 1:row0 + nrows - k - 1 + len(toks)]
                    out.logprobs[i] = self.sampler.compute_logprobs(r, toks, st.params.logprobs)
            else:
                rows.append(row0 + nrows - 1)
                reqs.append(i)
        if rows:
            states = [self.states[plan.req_ids[i]] for i in reqs]
            sb = SamplingBatch(
                params=[s.params for s in states],
                prompt_token_ids=[s.prompt_token_ids for s in states],
                output_token_ids=[s.output_token_ids for s in states],
                eos_token_ids=[s.eos_token_ids for s in states],
                generators=[self._generator(s) for s in states])
            idx = torch.tensor(rows, device=logits.device)
            res = self.sampler(logits.index_select(0, idx) if len(rows) != logits.shape[0] else logits, sb)
            for j, i in enumerate(reqs):
                out.sampled_token_ids[i] = [res.token_ids[j]]
                if res.logprobs[j] is not None:
                    out.logprobs[i] = [res.logprobs[j]]
        for i, rid in enumerate(plan.req_ids):
            toks = out.sampled_token_ids[i]
            if toks:
                st = self.states[rid]
                st.token_ids.extend(toks)
                if self.proposer is not None:
                    drafts = self.proposer.propose(st.token_ids)
                    if drafts:
                        out.draft_token_ids[rid] = drafts
        return out

    def _generator(self, st: RunnerRequestState) -> Optional[torch.Generator]:
        if st.params.seed is None or st.params.greedy:
            return None
        # on the runner's device: a CPU generator cannot draw into the CUDA tensors of the sampler
        return make_request_generator(st.params.seed, len(st.token_ids) - st.num_prompt_tokens, self.device)

    def _prompt_logprobs(self, st: RunnerRequestState, start: int, rows: torch.Tensor) -> list[Optional[Logprob]]:
        """Logprobs of prompt positions start+1 .. (rows predict the next position); None for position 0."""
        end = min(start + rows.shape[0], st.num_prompt_tokens - 1)  # last position predicted
        out: list[Optional[Logprob]] = [None] if start == 0 else []
        n = end - start
        if n > 0:
            targets = st.token_ids[start + 1:end + 1]
            out.extend(self.sampler.compute_logprobs(rows[:n], targets, st.params.prompt_logprobs))
        return out
