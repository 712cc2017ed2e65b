"""The command line as a user runs it: answers, streaming chat, one-line errors with exit code 2."""
from __future__ import annotations

import builtins

import pytest

from tests.model.tiny_models import tiny_config
from tokenmill.cli import main


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary size, so real text and chat templates fit."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.vocab_size = 49152
    cfg.max_position_embeddings = 1024
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = str(tmp_path_factory.mktemp("cli-llama"))
    model.save_pretrained(path)
    return path


def test_generate_prints_text(tiny_llama, gguf_tokenizer_path, capsys):
    rc = main(["generate", "hello there", "--model", tiny_llama, "--tokenizer", gguf_tokenizer_path,
               "--max-tokens", "5", "--raw"])
    assert rc == 0
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.parametrize("argv, needle", [
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--model", "/no/such/model"], "does not exist"),
    (["generate", "hi", "--block-size", "3"], "block_size"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_chat_streams_and_keeps_history(tiny_llama, gguf_tokenizer_path, capsys, monkeypatch):
    lines = iter(["first question", "second question", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    rc = main(["chat", "--model", tiny_llama, "--tokenizer", gguf_tokenizer_path, "--max-tokens", "4",
               "--temperature", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert len([ln for ln in out.splitlines() if ln.strip()]) >= 1


@pytest.mark.parametrize("value", ["0", "-3"])
def test_serve_rejects_nonpositive_max_waiting_requests(value, capsys):
    assert main(["serve", "--max-waiting-requests", value]) == 2
    err = capsys.readouterr().err.strip()
    assert "max_waiting_requests" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_serve_flags_are_generated_from_the_config_dataclasses():
    """One generator makes the engine and server flags: types, bool --no- forms, choices, unset = default."""
    from tokenmill.cli import build_parser
    from tokenmill.config import config_from_args
    from tokenmill.server.config import ServerConfig, server_config_from_args

    args = build_parser().parse_args(["serve", "--port", "9001", "--request-timeout-s", "3.5", "--api-key", "k",
                                      "--no-enable-prefix-caching", "--max-waiting-requests", "5",
                                      "--policy", "fair", "--served-model-name", "m"])
    engine, server = config_from_args(args), server_config_from_args(args)
    assert (server.port, server.request_timeout_s, server.api_key) == (9001, 3.5, "k")
    assert server.watchdog_s == ServerConfig().watchdog_s  # not given: the dataclass default
    assert engine.cache.enable_prefix_caching is False and engine.scheduler.max_waiting_requests == 5
    assert engine.scheduler.policy == "fair" and engine.model.served_model_name == "m"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--policy", "random"])
