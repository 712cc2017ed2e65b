"""LoRARequest: which adapter a request runs with (vLLM's names). Pure Python."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRARequest:
    """lora_name: the name the API serves it under (a request's `model`); lora_int_id: a positive id, unique
    per adapter (0 is the base model); lora_path: a PEFT folder (adapter_config.json +
    adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        from tokenmill.errors import InvalidRequestError

        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise InvalidRequestError("lora_name must be a non-empty string", param="lora_name")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise InvalidRequestError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}",
                                      param="lora_int_id")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise InvalidRequestError("lora_path must be a non-empty string", param="lora_path")
