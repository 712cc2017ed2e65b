"""ServerConfig: HTTP-layer settings. CLI flags are generated from the fields (`add_server_args`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from tokenmill.config import add_dataclass_args
from tokenmill.errors import ConfigError


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ServerConfig:
    host: str = _f("127.0.0.1", "address to bind (use 0.0.0.0 to listen on all interfaces)")
    port: int = _f(8000, "TCP port to listen on")
    api_key: Optional[str] = _f(None, "require `Authorization: Bearer <key>` on /v1 routes")
    served_model_name: Optional[str] = _f(None, "model name reported by /v1/models and accepted in requests "
                                                "(default: the engine's model name)")
    max_request_body_bytes: int = _f(4 * 1024 * 1024, "largest accepted request body (larger: HTTP 413)")
    request_timeout_s: Optional[float] = _f(600.0, "per-request time limit; on expiry the request is aborted "
                                                   "(HTTP 408 or an SSE error event)")
    read_timeout_s: float = _f(30.0, "time a client has to send its request headers, and then its body "
                                     "(else HTTP 408 and the connection is closed)")
    stream_stall_timeout_s: float = _f(30.0, "a streaming client that reads nothing for this long has its request "
                                             "aborted and its connection closed")
    max_tokens_default: Optional[int] = _f(None, "max_tokens of a request that sets none (default: the context "
                                                 "left; max_model_len for kv_eviction=streaming)")
    tool_call_parser: Optional[str] = _f(None, "how model output becomes tool_calls (default: chosen from the "
                                               "chat template)",
                                         choices=["hermes", "llama3_json", "mistral", "generic"])
    shutdown_grace_s: float = _f(10.0, "on SIGTERM: seconds in-flight requests may finish before they are aborted")
    watchdog_s: float = _f(60.0, "/health fails when requests are pending and the engine loop has not "
                                 "completed a step for this long")
    retry_after_s: int = _f(1, "Retry-After header value (seconds) on HTTP 429")
    engine_process: bool = _f(True, "run the engine core (scheduler + model) in its own process, spoken to over "
                                    "ZeroMQ; --no-engine-process keeps it on a thread of the server process. "
                                    "If the engine process dies, in-flight requests end with an error, /health "
                                    "fails and the server exits with code 1 (a supervisor restarts it)")
    responses_store_mib: float = _f(64.0, "memory for finished /v1/responses kept for previous_response_id and "
                                          "GET (an LRU; 0 keeps none)")
    finetune_dir: Optional[str] = _f(None, "folder for uploaded fine-tuning files and the adapters jobs train "
                                           "(<dir>/files, <dir>/adapters/<job id>); default: a new temporary "
                                           "folder per server start")
    data_parallel_size: int = _f(1, "engine-core processes (replicas, each with the whole model) behind this one "
                                    "server; each on its own CPU cores, or on cuda:i (tokenmill/router/dp_client.py)")
    data_parallel_policy: str = _f("prefix", "how a request's replica is chosen (--data-parallel-size > 1)",
                                   choices=["round-robin", "least-load", "prefix"])
    log_level: str = _f("info", "uvicorn log level", choices=["critical", "error", "warning", "info", "debug"])

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.max_request_body_bytes < 1024:
            raise ConfigError(f"max_request_body_bytes must be at least 1024, got {self.max_request_body_bytes}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ConfigError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.read_timeout_s <= 0:
            raise ConfigError(f"read_timeout_s must be positive, got {self.read_timeout_s}")
        if self.stream_stall_timeout_s <= 0:
            raise ConfigError(f"stream_stall_timeout_s must be positive, got {self.stream_stall_timeout_s}")
        if self.max_tokens_default is not None and self.max_tokens_default < 1:
            raise ConfigError(f"max_tokens_default must be at least 1, got {self.max_tokens_default}")
        if self.watchdog_s <= 0:
            raise ConfigError(f"watchdog_s must be positive, got {self.watchdog_s}")
        if self.responses_store_mib < 0:
            raise ConfigError(f"responses_store_mib must be >= 0, got {self.responses_store_mib}")
        if self.data_parallel_size < 1:
            raise ConfigError(f"data_parallel_size must be at least 1, got {self.data_parallel_size}")
        if self.data_parallel_size > 1 and not self.engine_process:
            raise ConfigError("--data-parallel-size > 1 runs engine processes: drop --no-engine-process")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key must not be empty")


def add_server_args(parser: argparse.ArgumentParser,
                    skip: tuple[str, ...] = ("served_model_name", "log_level")) -> None:
    """Add one --flag per ServerConfig field (underscores become dashes). By default served_model_name and
    log_level are skipped: the engine flags (ModelConfig) and the top-level --log-level define them."""
    add_dataclass_args(parser.add_argument_group("server options"), ServerConfig, skip)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    names = {f.name for f in fields(ServerConfig)}
    cfg = ServerConfig(**{k: v for k, v in vars(args).items() if k in names})
    cfg.validate()
    return cfg
