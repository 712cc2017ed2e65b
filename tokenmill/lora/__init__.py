"""Multi-LoRA serving: PEFT adapters over one base model, many adapters (and the base) in one batch.

request.py   LoRARequest (vLLM's names), pure Python
config.py    LoRAConfig (engine args --enable-lora, --lora-modules, --max-loras, ...), pure Python
adapter.py   reading and validating a PEFT folder (adapter_config.json + adapter_model.safetensors)
registry.py  the engine's adapters: names, ids, which are held in memory (LRU), requests in flight (pure Python)
runtime.py   the runner's side: per-slot stacked A/B buffers, the step's token -> slot mapping, the layer hooks
The batched op itself is in tokenmill/ops/lora/ (reference, Triton) and tokenmill/ops/cpu/lora.py (CPU path).
"""
from tokenmill.lora.request import LoRARequest

__all__ = ["LoRARequest"]
