"""Plain data types shared by the serving benchmark: requests to send, conversations, measured records."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from tokenmill.errors import TokenmillError


class BenchError(TokenmillError):
    """A benchmark input is invalid (workload, rates, JSONL file) or the server cannot be reached."""


@dataclass
class BenchRequest:
    """One request to send: a prompt (completions) or messages (chat), plus limits and targets.

    `prompt_len` is the client's estimate of the prompt size in tokens (exact when a tokenizer was used).
    `ttft_ms` / `tpot_ms` override the run's global SLO targets for this request.
    `delay_s`, when set, is the request's arrival time in seconds after the start of the run
    (it replaces the generated open-loop arrival time; trace replay).
    """

    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = None
    max_tokens: int = 128
    prompt_len: int = 0
    ttft_ms: Optional[float] = None
    tpot_ms: Optional[float] = None
    priority: Optional[int] = None
    user: Optional[str] = None
    ignore_eos: bool = False
    delay_s: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (None fields dropped)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Conversation:
    """The unit of one open-loop arrival: one request, or several turns sent in a closed loop.

    Turn i+1 is sent only after turn i completes; it resends the history (earlier user turns and the
    server's actual replies) followed by its own user message.
    """

    turns: list[BenchRequest]
    conv_id: int = 0

    @property
    def delay_s(self) -> Optional[float]:
        """The explicit arrival time of the first turn, if any."""
        return self.turns[0].delay_s if self.turns else None


@dataclass
class RequestRecord:
    """What the client measured for one request (times in seconds, relative to the run start)."""

    conv_id: int
    turn: int
    prompt_len: int
    max_tokens: int
    scheduled_s: float = 0.0
    start_s: float = 0.0
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    usage_prompt_tokens: Optional[int] = None
    usage_completion_tokens: Optional[int] = None
    success: bool = False
    status: int = 0
    error: str = ""
    slo_ttft_ms: Optional[float] = None
    slo_tpot_ms: Optional[float] = None
    text: str = ""

    @property
    def tpot_s(self) -> Optional[float]:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if not self.success or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def meets_slo(self) -> bool:
        """True when the request succeeded and met both its TTFT and TPOT targets (absent target = met)."""
        if not self.success:
            return False
        if self.slo_ttft_ms is not None and (self.ttft_s is None or self.ttft_s * 1e3 > self.slo_ttft_ms):
            return False
        tpot = self.tpot_s
        if self.slo_tpot_ms is not None and tpot is not None and tpot * 1e3 > self.slo_tpot_ms:
            return False
        return True

    def to_dict(self, keep_text: bool = False) -> dict[str, Any]:
        """A JSON-friendly dict; the reply text is dropped unless `keep_text`."""
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        d["meets_slo"] = self.meets_slo()
        if not keep_text:
            d.pop("text")
        return d
