"""LoRAConfig: the multi-LoRA engine args (one section of tokenmill.config.EngineConfig). Pure Python."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from tokenmill.errors import ConfigError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class LoRAConfig:
    enable_lora: bool = _f(False, "serve LoRA adapters (PEFT folders) over the base model, many in one batch")
    lora_modules: Optional[list[str]] = _f(None, "adapters to serve from the start, as name=path (a PEFT folder); "
                                                 "a request's `model` names one", nargs="+")
    max_loras: int = _f(1, "most distinct adapters in one step (the scheduler holds back requests of others)")
    max_lora_rank: int = _f(16, "highest adapter rank accepted (buffers are sized for it)")
    max_cpu_loras: Optional[int] = _f(None, "adapters held in memory at once (default: max_loras); beyond that the "
                                            "least recently used idle one is dropped and read again from its "
                                            "folder when next asked for")
    enable_lora_runtime_updates: bool = _f(False, "server: accept POST /v1/load_lora_adapter and "
                                                  "/v1/unload_lora_adapter")

    @property
    def num_slots(self) -> int:
        """Adapters held in memory (the runner's buffer slots)."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    def parsed_modules(self) -> list[tuple[str, str]]:
        """--lora-modules as (name, path) pairs; a malformed entry is a ConfigError."""
        out: list[tuple[str, str]] = []
        for item in self.lora_modules or []:
            name, sep, path = str(item).partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(f"--lora-modules takes name=path, got {item!r}", param="lora_modules")
            if any(n == name.strip() for n, _ in out):
                raise ConfigError(f"--lora-modules names {name.strip()!r} twice", param="lora_modules")
            out.append((name.strip(), path.strip()))
        return out

    def validate(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}", param=name)
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})",
                              param="max_cpu_loras")
        mods = self.parsed_modules()
        if not self.enable_lora and (mods or self.enable_lora_runtime_updates):
            raise ConfigError("lora_modules and enable_lora_runtime_updates need enable_lora", param="enable_lora")
