"""`tokenmill router` start-up errors (no backends needed) and the data-parallel helpers: fast."""
from __future__ import annotations

import pytest

from tests.router.procs import run_router
from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError
from tokenmill.router.backends import check_backend_url, parse_load
from tokenmill.router.dp_client import replica_configs, split_cores


@pytest.mark.parametrize("url,why", [("localhost:8000", "expected http://HOST:PORT"),
                                     ("http://127.0.0.1:99999", "port"),
                                     ("ftp://x:1", "expected http://HOST:PORT"),
                                     ("http://h:1/?a=b", "query")])
def test_bad_urls(url, why):
    with pytest.raises(ConfigError, match=why):
        check_backend_url(url)
    assert check_backend_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"


def test_cli_errors_are_one_line():
    r = run_router("--backend", "nonsense", "--policy", "round-robin")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "bad backend URL 'nonsense'" in r.stderr
    r = run_router("--backend", "http://127.0.0.1:9", "--policy", "round-robin", "--startup-timeout-s", "0.5")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "backend http://127.0.0.1:9 is not a reachable tokenmill server" in r.stderr
    r = run_router("--backend", "http://a:1", "--backend", "http://a:1/", "--policy", "round-robin")
    assert r.returncode == 2 and "more than once" in r.stderr
    r = run_router("--policy", "prefix")
    assert r.returncode == 2 and "--backend" in r.stderr


@pytest.mark.parametrize("args,why", [
    (("--prefill", "http://127.0.0.1:9"), "needs at least one --prefill and one --decode"),
    (("--decode", "http://127.0.0.1:9"), "needs at least one --prefill and one --decode"),
    (("--backend", "http://127.0.0.1:8", "--prefill", "http://127.0.0.1:9", "--decode", "http://127.0.0.1:7"),
     "not both"),
    (("--prefill", "http://127.0.0.1:9", "--decode", "http://127.0.0.1:9/"), "both a prefill and a decode"),
    (("--prefill", "nonsense", "--decode", "http://127.0.0.1:9"), "bad backend URL 'nonsense'"),
])
def test_disaggregated_cli_errors_are_one_line(args, why):
    r = run_router(*args, "--policy", "least-load", "--startup-timeout-s", "0.5")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and why in r.stderr, r.stderr


def test_parse_load():
    text = ("# HELP x\ntokenmill:num_requests_running 3.0\ntokenmill:num_requests_waiting 2.0\n"
            "tokenmill:kv_cache_usage_ratio 0.25\ntokenmill:kv_cache_blocks_used 9.0\n")
    assert parse_load(text) == {"running": 3.0, "waiting": 2.0, "kv_usage": 0.25}


def test_split_cores():
    assert split_cores([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert split_cores([3, 1], 2) == [[1], [3]]
    assert split_cores([0], 2) == [None, None]


def test_replica_devices():
    cfg = EngineConfig.from_kwargs(device="cuda")
    assert [c.model.device for c in replica_configs(cfg, 2, cuda_count=2)] == ["cuda:0", "cuda:1"]
    with pytest.raises(ConfigError, match="needs 2 CUDA devices"):
        replica_configs(cfg, 2, cuda_count=1)
    with pytest.raises(ConfigError, match="not cuda:1"):
        replica_configs(EngineConfig.from_kwargs(device="cuda:1"), 2, cuda_count=2)
    assert [c.model.device for c in replica_configs(EngineConfig.from_kwargs(), 2, cuda_count=0)] == ["auto", "auto"]


def test_data_parallel_server_flags():
    from tokenmill.server.config import ServerConfig

    with pytest.raises(ConfigError, match="drop --no-engine-process"):
        ServerConfig(data_parallel_size=2, engine_process=False).validate()
    with pytest.raises(ConfigError, match="at least 1"):
        ServerConfig(data_parallel_size=0).validate()
    ServerConfig(data_parallel_size=2).validate()
