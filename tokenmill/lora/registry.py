"""The engine's adapters (EngineCore side): ids, names, folders, which are held in memory (the runner's slots,
LRU order), and the loads / drops the next step hands the runner. Pure Python: weights are opaque here."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

from tokenmill.errors import EngineOverloadedError, TokenmillError


class LoRAInUseError(TokenmillError):
    """An adapter with unfinished requests cannot be unloaded (HTTP 409)."""

    http_status = 409
    error_type = "conflict_error"


class LoRARegistry:
    def __init__(self, num_slots: int, reader: Callable[[int, str, str], Any]):
        """reader(lora_id, name, path) reads an adapter's weights again after it was dropped from memory."""
        self.num_slots = num_slots
        self.reader = reader
        self.adapters: dict[int, tuple[str, str]] = {}  # id -> (name, path)
        self.resident: OrderedDict[int, None] = OrderedDict()  # ids held in the runner's slots, LRU first
        self.pending_loads: dict[int, Any] = {}
        self.pending_unloads: list[int] = []
        self.num_reloads = 0  # adapters read again after an LRU drop (cumulative)

    def name_of(self, lora_id: int) -> str:
        return self.adapters.get(lora_id, (f"lora-{lora_id}", ""))[0]

    def add(self, lora_id: int, name: str, path: str, weights: Any, in_use: Callable[[int], bool]) -> bool:
        """Register and hold in memory; False if the id is already registered."""
        if lora_id in self.adapters:
            return False
        self._make_room(in_use)
        self.adapters[lora_id] = (name, path)
        self._hold(lora_id, weights)
        return True

    def remove(self, lora_id: int, in_use: Callable[[int], bool]) -> bool:
        if lora_id not in self.adapters:
            return False
        if in_use(lora_id):
            raise LoRAInUseError(f"the adapter {self.name_of(lora_id)!r} has unfinished requests; unload it when "
                                 "they are done", param="lora_name")
        del self.adapters[lora_id]
        self._drop(lora_id)
        return True

    def ensure_resident(self, lora_id: int, in_use: Callable[[int], bool]) -> None:
        """Before a request of `lora_id` enters: read it again if it was dropped (marks it most recently used)."""
        if lora_id not in self.adapters:
            from tokenmill.errors import InvalidRequestError

            raise InvalidRequestError(f"unknown LoRA adapter id {lora_id}", param="model")
        if lora_id in self.resident:
            self.resident.move_to_end(lora_id)
            return
        self._make_room(in_use)
        name, path = self.adapters[lora_id]
        self._hold(lora_id, self.reader(lora_id, name, path))
        self.num_reloads += 1

    def attach(self, sched: Any) -> None:
        """Hand the pending loads / drops to this step's SchedulerOutput."""
        if self.pending_loads or self.pending_unloads:
            sched.lora_unloads, sched.lora_loads = self.pending_unloads, self.pending_loads
            self.pending_unloads, self.pending_loads = [], {}

    def _hold(self, lora_id: int, weights: Any) -> None:
        self.resident[lora_id] = None
        self.pending_loads[lora_id] = weights

    def _drop(self, lora_id: int) -> None:
        if lora_id in self.resident:
            del self.resident[lora_id]
            if self.pending_loads.pop(lora_id, None) is None:
                self.pending_unloads.append(lora_id)

    def _make_room(self, in_use: Callable[[int], bool]) -> None:
        if len(self.resident) < self.num_slots:
            return
        victim: Optional[int] = next((i for i in self.resident if not in_use(i)), None)
        if victim is None:
            raise EngineOverloadedError(f"all {self.num_slots} LoRA slots (max_cpu_loras) hold adapters with "
                                        "unfinished requests; try again later")
        self._drop(victim)
