"""Device-specific wiring of the model runner: attention backend, KV sizing on CUDA, CUDA graphs.

`DeviceSetup` keeps the runner device-agnostic. The runner calls it at four points:

    attach(model)              after the model is loaded: pick and install the attention backend
    plan_kv_budget(runner)     CUDA only: profile one forward of max_num_batched_tokens tokens, plan the
                               KV cache with memory_planner, log the plan table; returns the KV bytes
    capture(kv_caches, ...)    after the KV cache is allocated: bind it, capture decode CUDA graphs
    forward(batch)             one step's forward: replay a graph when one fits, else run eagerly

Backends: "reference" (PyTorch, runs anywhere), "cpu" (compiled C/OpenMP kernel, CPU only), "triton"
(Triton kernels; on CPU only in Triton's interpreter, used by tests), "auto" (triton on CUDA when
importable; on CPU the cpu kernel when it builds; else reference). CUDA graphs need a
backend that reads only device tensors, so they are captured only with triton, on CUDA, without
enforce_eager; everywhere else `forward` is the plain eager call.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import TYPE_CHECKING, Any, Optional

import torch

from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError
from tokenmill.ops.attention.backend import AttentionBackend, CpuAttentionBackend, ReferenceAttentionBackend
from tokenmill.ops.attention.reference import allocate_kv_cache
from tokenmill.ops.cpu.attention import cpu_attention_available
from tokenmill.ops.cpu.build import build_error
from tokenmill.worker.forward_batch import ForwardBatch, build_forward_batch
from tokenmill.worker.graphs import CUDAGraphRunner
from tokenmill.worker.memory_planner import DeviceMemory, MemoryPlan, measure_device_memory, plan_kv_cache

if TYPE_CHECKING:
    from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "reference", "cpu", "triton")
GRAPH_POOL_MARGIN_BYTES = 256 << 20  # graph-private allocations beyond the scaled activations


def triton_importable() -> bool:
    """Whether the triton package is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _load_triton_backend(device: torch.device) -> AttentionBackend:
    """A TritonAttentionBackend; ConfigError when triton cannot run on `device`."""
    try:
        kernels = importlib.import_module("tokenmill.ops.attention.triton_kernels")
        mod = importlib.import_module("tokenmill.ops.attention.triton_attention")
    except Exception as e:  # not installed, or broken
        raise ConfigError(f"attention_backend 'triton' needs the triton package: {type(e).__name__}: {e}",
                          param="attention_backend") from None
    if device.type != "cuda" and type(kernels._write_kv_kernel).__name__ != "InterpretedFunction":
        raise ConfigError("attention_backend 'triton' without CUDA runs only in Triton's interpreter "
                          "(TRITON_INTERPRET=1 before start; slow, for tests): use reference on CPU",
                          param="attention_backend")
    return mod.TritonAttentionBackend()


def select_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend for an attention_backend setting on `device` (auto: triton on CUDA when importable,
    the compiled cpu kernel on CPU when it builds, else reference)."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention_backend {name!r}; choose {', '.join(ATTENTION_BACKENDS)}",
                          param="attention_backend")
    if name == "auto":
        if device.type == "cuda":
            name = "triton" if triton_importable() else "reference"
        else:
            name = "cpu" if device.type == "cpu" and cpu_attention_available() else "reference"
    if name == "triton":
        return _load_triton_backend(device)
    if name == "cpu":
        if device.type != "cpu":
            raise ConfigError(f"attention_backend 'cpu' runs on the CPU only, not {device.type}",
                              param="attention_backend")
        if not cpu_attention_available():
            raise ConfigError(f"attention_backend 'cpu': the C kernel cannot be built ({build_error('attention')})",
                              param="attention_backend")
        return CpuAttentionBackend()
    return ReferenceAttentionBackend()


def profile_batch(num_tokens: int, max_model_len: int, max_num_seqs: int, block_size: int,
                  device: torch.device) -> ForwardBatch:
    """A prefill batch of num_tokens tokens in sequences of at most max_model_len tokens, for profiling.

    Every slot is -1 (nothing is written) and every block table points at block 0, so a one-block KV
    cache serves it; the values read are meaningless, the memory use is that of a real step.
    """
    max_len = max(1, min(max_model_len, num_tokens))
    lens, left = [], num_tokens
    while left > 0 and len(lens) < max_num_seqs:
        lens.append(min(max_len, left))
        left -= lens[-1]
    tables = [[0] * -(-n // block_size) for n in lens]
    batch = build_forward_batch([[0] * n for n in lens], [0] * len(lens), tables, block_size, device)
    batch.slot_mapping.fill_(-1)
    return batch


class DeviceSetup:
    """Attention backend, CUDA memory plan and CUDA graphs of one model runner (see the module doc)."""

    def __init__(self, config: EngineConfig, device: torch.device):
        self.config = config
        self.device = device
        self.backend: Optional[AttentionBackend] = None
        self.plan: Optional[MemoryPlan] = None
        self.graphs: Optional[CUDAGraphRunner] = None
        self._model: Any = None
        self._kv_caches: list[torch.Tensor] = []
        self._replay = False  # graphs captured: try them in forward()
        self.num_graph_replays = 0

    @property
    def backend_name(self) -> str:
        return getattr(self.backend, "name", "reference")

    # ---- hooks ---------------------------------------------------------------------------------
    def attach(self, model: Any) -> AttentionBackend:
        """Select the attention backend and install it in every attention layer of `model`."""
        self.backend = select_attention_backend(self.config.model.attention_backend, self.device)
        self._model = model
        model.set_attention_backend(self.backend)
        logger.info("attention backend: %s", self.backend_name)
        from tokenmill.model.layers.moe import moe_blocks

        if moe_blocks(model):  # MoE layers: the fused MoE op for this device (grouped / Triton)
            from tokenmill.ops.moe import select_moe_op

            op = select_moe_op(self.device)
            model.set_moe_op(op)
            logger.info("fused MoE op: %s", op.__name__)
        if self.backend_name == "cpu":  # packed layers run whole in one C call for small batches
            from tokenmill.model.layers.quantized import dense_gemm_dtype, panel_kinds
            from tokenmill.ops.cpu.layer import fuse_cpu_layers

            # prefill attention follows the packed linears' large-GEMM dtype (bf16 on AMX / AVX512-BF16 CPUs)
            self.backend.prefill_dtype = dense_gemm_dtype(model)
            kinds = panel_kinds(model)
            if kinds:  # which panels the packed linears' many-row calls run (made once at load)
                logger.info("GEMM panels: %s", ", ".join(f"{n} linears {k}" for k, n in sorted(kinds.items())))

            n = fuse_cpu_layers(model)
            if n:
                logger.info("fused CPU decoder layers: %d", n)
            from tokenmill.ops.cpu.moe_layer import fuse_moe_layers

            n = fuse_moe_layers(model)  # MoE layers (packed experts): their decode steps in one C call
            if n:
                logger.info("fused CPU MoE decoder layers: %d", n)
            from tokenmill.ops.cpu.dense import prepack_bf16_linears

            prepack_bf16_linears(model)  # bf16 checkpoints' dense linears: oneDNN on a prepacked weight
        return self.backend

    def plan_kv_budget(self, runner: "ModelRunner") -> int:
        """CUDA: bytes for the KV cache after weights, a profiled peak forward, other use and graphs.

        Logs the plan table; raises ConfigError (naming the setting to change) when it cannot fit.
        """
        peak_tokens = self.config.scheduler.max_num_batched_tokens
        dev = measure_device_memory(self.device, lambda: self.profile_forward(runner.model, peak_tokens,
                                                                              runner.max_model_len,
                                                                              runner.block_size, runner.dtype))
        return self.plan_from_measurement(dev, runner.kv_bytes_per_block(), runner.block_size,
                                          runner.max_model_len).kv_cache_bytes

    def plan_from_measurement(self, dev: DeviceMemory, bytes_per_block: int, block_size: int,
                              max_model_len: int) -> MemoryPlan:
        """Plan the KV cache for a measured (or simulated) device; sets and logs self.plan.

        When max_model_len was not set by the user and one full sequence does not fit, the plan is
        made for one block and the runner lowers max_model_len to what fits.
        """
        cc = self.config.cache
        args = dict(device=dev, gpu_memory_utilization=cc.gpu_memory_utilization,
                    bytes_per_token=bytes_per_block // block_size, block_size=block_size,
                    cuda_graph_bytes=self.graph_bytes_estimate(dev))
        try:
            plan = plan_kv_cache(max_model_len=max_model_len, **args)
        except ConfigError as e:
            if self.config.model.max_model_len is not None or getattr(e, "param", None) != "max_model_len":
                raise
            plan = plan_kv_cache(max_model_len=block_size, **args)
        self.plan = plan
        logger.info("%s", plan.table())
        return plan

    def graph_bytes_estimate(self, dev: DeviceMemory) -> int:
        """Memory the decode graphs will hold: activations scale with tokens (max_num_seqs of the
        profiled max_num_batched_tokens), plus a fixed margin; 0 when no graphs will be captured."""
        if not self.graphs_wanted:
            return 0
        sc = self.config.scheduler
        frac = min(1.0, sc.max_num_seqs / sc.max_num_batched_tokens)
        return int(dev.peak_activation_bytes * frac) + GRAPH_POOL_MARGIN_BYTES

    @property
    def _expert_parallel(self) -> bool:
        pc = self.config.parallel
        return pc.enable_expert_parallel and pc.tensor_parallel_size > 1

    @property
    def graphs_wanted(self) -> bool:
        """CUDA graphs will be captured: CUDA, not enforce_eager, no expert parallelism over several ranks (its
        pair compaction syncs with the host), and a graph-safe (triton) backend."""
        if self.config.model.enforce_eager or self.device.type != "cuda" or self._expert_parallel:
            return False
        if self.config.model.moe_expert_cache_gb is not None:  # expert offload plans each layer on the host
            return False
        if getattr(self._model, "latent_kv_cache", False):  # MLA attention loops over requests on the host
            return False
        name = self.config.model.attention_backend
        return name == "triton" or (name == "auto" and triton_importable())

    @torch.inference_mode()
    def profile_forward(self, model: Any, num_tokens: int, max_model_len: int, block_size: int,
                        dtype: torch.dtype) -> None:
        """One forward of num_tokens tokens on a one-block KV cache, plus logits for max_num_seqs rows."""
        sc = self.config.scheduler
        batch = profile_batch(num_tokens, max_model_len, sc.max_num_seqs, block_size, self.device)
        kv = allocate_kv_cache(model.num_layers, 1, block_size, model.num_kv_heads, model.head_dim, dtype,
                               self.device)
        hidden = model(batch.input_ids, batch.positions, kv, batch)
        rows = torch.arange(min(sc.max_num_seqs, hidden.shape[0]), device=self.device)
        torch.softmax(model.compute_logits(hidden.index_select(0, rows)), dim=-1)

    def capture(self, kv_caches: list[torch.Tensor], max_model_len: int, block_size: int) -> int:
        """Bind the KV cache; capture decode graphs when wanted. Returns the number captured."""
        self._kv_caches = kv_caches
        sc = self.config.scheduler
        self.graphs = CUDAGraphRunner(self._eager, max_num_seqs=sc.max_num_seqs,
                                      max_blocks_per_seq=-(-max_model_len // block_size),
                                      max_model_len=max_model_len, block_size=block_size, device=self.device,
                                      enforce_eager=self.config.model.enforce_eager)
        offload = self.config.model.moe_expert_cache_gb is not None
        latent = getattr(self._model, "latent_kv_cache", False)
        if not self.graphs.enabled or self.backend_name != "triton" or self._expert_parallel or offload or latent:
            if self.graphs.enabled:
                why = ("expert parallelism compacts routed pairs with a host sync" if self._expert_parallel
                       else "expert offload plans every MoE layer on the host" if offload
                       else "MLA attention (PyTorch) reads the batch's host-side lengths" if latent
                       else f"the {self.backend_name} attention backend cannot be captured")
                logger.info("CUDA graphs off: %s", why)
            return 0
        n = self.graphs.capture()
        self._replay = n > 0
        logger.info("captured %d CUDA graphs (decode batch sizes %s)", n, self.graphs.captured_sizes)
        return n

    def _eager(self, batch: ForwardBatch) -> torch.Tensor:
        return self._model(batch.input_ids, batch.positions, self._kv_caches, batch)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states [T, hidden] of one step: a graph replay when one fits, else the eager forward."""
        if self._replay and self.graphs.can_run(batch):
            self.num_graph_replays += 1
            return self.graphs.replay(batch)
        return self._model(batch.input_ids, batch.positions, self._kv_caches, batch)
