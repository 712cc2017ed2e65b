"""Fine-tuning in the engine: the functional LoRA forward against transformers + peft, training that learns a
fixed reply, cancellation that frees everything, training interleaved with inference, training files."""
from __future__ import annotations

import gc
import json
import os
import weakref

import pytest
import torch

from tests.finetune.conftest import QUESTION, REPLY, fixed_reply_examples, jsonl
from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError
from tokenmill.finetune.data import parse_chat_jsonl
from tokenmill.finetune.jobs import resolve_hyperparameters
from tokenmill.finetune.lora import TARGET_MODULES, LoRAWeights, lora_forward
from tokenmill.finetune.offline import make_spec, run_to_end


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    path, tok, _ = tiny_chat_model
    return LLM(path, tokenizer=tok, dtype="float32", max_model_len=256)


def _spec(llm, tmp_path, job_id="ftjob-t", n_epochs=10, lr=20.0, targets="all", rank=8, n=4):
    exs = [e["messages"] for e in fixed_reply_examples(n)]
    hp = resolve_hyperparameters({"n_epochs": n_epochs, "batch_size": 2, "learning_rate_multiplier": lr},
                                 {"target_modules": targets, "lora_rank": rank}, n, 0)
    return make_spec(llm.engine.processor, exs, hp, job_id, str(tmp_path / job_id), "tiny", f"ft:tiny:{job_id}", 512)


def _prompt_ids(llm) -> list[int]:
    return llm.engine.processor.apply_chat_template([{"role": "user", "content": QUESTION}])


def _hf(tiny_chat_model):
    """A fresh transformers copy (peft injects its layers into the model it wraps)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_chat_model[0], torch_dtype=torch.float32,
                                                attn_implementation="eager").eval()


def _peft_model(tiny_chat_model, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(_hf(tiny_chat_model), folder).eval()


@pytest.mark.parametrize("targets,rank", [(["q_proj", "v_proj"], 4), ("all", 8)])
def test_saved_adapter_loads_in_peft_with_equal_logits(llm, tiny_chat_model, tmp_path, targets, rank):
    model = llm.engine.core.runner.model
    hp = resolve_hyperparameters({}, {"target_modules": targets, "lora_rank": rank}, 10, 0)
    lora = LoRAWeights.init(model, hp.lora_rank, hp.lora_alpha, hp.target_modules, seed=1)
    with torch.no_grad():  # a fresh adapter has B = 0: make it a real delta
        for p in lora.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    lora.save_peft(str(tmp_path), "tiny")
    ids = torch.tensor([_prompt_ids(llm), list(range(5, 25)) + [0] * (len(_prompt_ids(llm)) - 20)])
    with torch.no_grad():
        ours = lora_forward(model, lora, ids)
        base = lora_forward(model, None, ids)
        ref_base = _hf(tiny_chat_model)(ids).logits.float()
        ref = _peft_model(tiny_chat_model, str(tmp_path))(input_ids=ids).logits.float()
    torch.testing.assert_close(base, ref_base, atol=2e-4, rtol=1e-4)  # the functional forward is the model
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the logits ...
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)  # ... exactly as peft applies it
    again = LoRAWeights.load_peft(str(tmp_path))
    assert sorted(again.targets) == sorted(lora.targets) and again.scaling == lora.scaling
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["r"] == rank


@pytest.mark.slow
def test_training_learns_fixed_reply(llm, tiny_chat_model, tmp_path):
    """Loss falls; the base model does not give the reply, the trained adapter does (peft merged into the HF
    model, and tokenmill's functional LoRA forward), and the saved adapter's logits equal peft's."""
    core = llm.engine.core
    greedy = SamplingParams(temperature=0, max_tokens=10)
    before = llm.chat([{"role": "user", "content": QUESTION}], greedy, use_tqdm=False)[0].outputs[0].text
    assert not before.startswith(REPLY)
    weights = [p.detach().clone() for p in core.runner.model.parameters()]
    spec = _spec(llm, tmp_path)
    core.finetune.submit(spec)
    updates = []
    last = run_to_end(core, spec.job_id, updates.append)
    assert last.status == "succeeded", last
    losses = [ev.data["train_loss"] for u in updates for ev in u.events if ev.type == "metrics"]
    assert len(losses) == spec.hp.n_epochs * 2 and losses[-1] < 0.6 * losses[0]
    assert sorted(os.listdir(spec.out_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    # the served weights are untouched, and inference still gives the base answer
    assert all(torch.equal(a, b) for a, b in zip(weights, core.runner.model.parameters()))
    assert llm.chat([{"role": "user", "content": QUESTION}], greedy, use_tqdm=False)[0].outputs[0].text == before
    tok = llm.get_tokenizer()
    ids = _prompt_ids(llm)
    merged = _peft_model(tiny_chat_model, spec.out_dir)
    with torch.no_grad():
        out = merged.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    assert tok.decode(out[0, len(ids):]).startswith(REPLY)
    lora = LoRAWeights.load_peft(spec.out_dir)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(lora_forward(core.runner.model, lora, torch.tensor([seq]))[0, -1].argmax()))
        ours = lora_forward(core.runner.model, lora, torch.tensor([seq]))
        ref = merged(input_ids=torch.tensor([seq])).logits.float()
    assert tok.decode(seq[len(ids):]).startswith(REPLY[:20])
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_cancel_mid_way_frees_everything(llm, tmp_path):
    core = llm.engine.core
    ft = core.finetune
    spec = _spec(llm, tmp_path, job_id="ftjob-c", n_epochs=50)
    ft.submit(spec)
    for _ in range(3):
        core.step()
    assert ft.trainer is not None and 0 < ft.trainer.step < ft.trainer.total_steps
    lora_ref = weakref.ref(ft.trainer.lora.A[0]["q_proj"])
    opt_ref = weakref.ref(ft.trainer.opt)
    trainer_ref = weakref.ref(ft.trainer)
    assert ft.cancel("ftjob-c")
    gc.collect()
    assert lora_ref() is None and opt_ref() is None and trainer_ref() is None
    assert ft.current is None and not ft.queue and not core.has_training()
    assert all(p.grad is None and not p.requires_grad for p in core.runner.model.parameters())
    ups = ft.take_updates()
    assert ups[-1].status == "cancelled" and ups[-1].job_id == "ftjob-c" and ups[-1].finished_at
    assert not os.path.exists(spec.out_dir)
    assert not ft.cancel("ftjob-c")  # unknown now


def test_training_interleaves_with_inference(llm, tmp_path):
    """Requests served while a job trains get the tokens they get alone; the job goes on between steps and ends."""
    core = llm.engine.core
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(10 + i, 30 + i))} for i in range(3)]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    spec = _spec(llm, tmp_path, job_id="ftjob-i", n_epochs=50)
    ft = core.finetune
    ft.submit(spec)
    core.step()  # starts the job (a first chunk)
    trained = ft.trainer.trained_tokens
    old, ft.max_step_s = ft.max_step_s, 30.0  # any chunk fits beside a step (this shared CPU's chunks are slow)
    try:
        together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        ft.max_step_s = old
    assert together == alone
    assert ft.trainer.trained_tokens > trained  # chunks ran beside the decode steps
    assert core.scheduler.kv.num_used_blocks == 0
    assert ft.cancel("ftjob-i")
    ft.take_updates()


def test_inference_goes_first(llm, tmp_path):
    """Beside an inference step a chunk gets only what the step leaves: nothing while requests wait for
    admission or when the step used the time; with no traffic at least one example, whatever its price."""
    from tokenmill.finetune.engine import StepUsage

    ft = llm.engine.core.finetune
    ft.submit(_spec(llm, tmp_path, job_id="ftjob-b", n_epochs=50))
    assert ft.train(None) > 0  # idle: starts the job, trains
    assert ft.train(StepUsage(seconds=0.001, tokens=4, num_waiting=1)) == 0  # a queue: inference first
    assert ft.train(StepUsage(seconds=ft.max_step_s, tokens=4, num_waiting=0)) == 0  # no time left
    assert ft.train(StepUsage(seconds=0.0, tokens=ft.max_batched_tokens, num_waiting=0)) == 0  # no tokens left
    old = ft.max_step_s
    ft.max_step_s = 1e-6  # priced far beyond the limit: idle still trains one example
    try:
        assert 0 < ft.train(None) <= max(e.num_tokens for e in ft.trainer.examples)
    finally:
        ft.max_step_s = old
    assert ft.cancel("ftjob-b")
    ft.take_updates()


@pytest.mark.slow
def test_job_on_unsupported_model_fails(tmp_path, gguf_path):
    """Packed GGUF weights cannot be trained through: the job fails with a clear error, serving goes on."""
    llm = LLM(gguf_path, max_model_len=256)
    spec = _spec(llm, tmp_path, job_id="ftjob-q")
    llm.engine.core.finetune.submit(spec)
    last = run_to_end(llm.engine.core, "ftjob-q", lambda u: None)
    assert last.status == "failed" and "--quantization none" in last.error["message"]


@pytest.mark.parametrize("text,line,needle", [
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"messages": [\n',
     2, "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "a"}]}\n', 1, "no assistant message"),
    (b'\n{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
     b'{"messages": [{"role": "robot", "content": "a"}]}', 3, "role"),
    (b'{"messages": [{"role": "assistant", "content": 3}]}', 1, "content must be a string"),
    (b'{"messages": [], "x": 1}', 1, "unsupported field"),
    (b'[1, 2]', 1, "JSON object"),
    (b'{"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]}', 1,
     "weight"),
])
def test_malformed_training_file_names_the_line(text, line, needle):
    with pytest.raises(InvalidRequestError) as e:
        parse_chat_jsonl(text)
    assert e.value.message.startswith(f"line {line}:") and needle in e.value.message and e.value.param == "file"


def test_examples_parse_and_mask_assistant_tokens_only(llm):
    exs = parse_chat_jsonl(jsonl(fixed_reply_examples(2)))
    hp = resolve_hyperparameters({}, {}, 2, None)
    spec = make_spec(llm.engine.processor, exs, hp, "j", "/nonexistent", "m", "ft:m:j", 512)
    tok = llm.get_tokenizer()
    ex = spec.examples[0]
    trained = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert trained.startswith(REPLY) and QUESTION not in trained and "user" not in trained
    with pytest.raises(InvalidRequestError, match="line 1: the example has .* tokens"):
        make_spec(llm.engine.processor, exs, hp, "j", "/x", "m", "ft:m:j", 8)


@pytest.mark.parametrize("hyper,extras,param", [
    ({"n_epochs": 0}, {}, "hyperparameters.n_epochs"),
    ({"batch_size": "big"}, {}, "hyperparameters.batch_size"),
    ({"learning_rate_multiplier": -1}, {}, "hyperparameters.learning_rate_multiplier"),
    ({"warmup": 1}, {}, "hyperparameters.warmup"),
    ({}, {"lora_rank": 0}, "lora_rank"),
    ({}, {"target_modules": ["qkv"]}, "target_modules"),
    ({}, {"lora_alpha": -2}, "lora_alpha"),
])
def test_bad_hyperparameters_name_the_param(hyper, extras, param):
    with pytest.raises(InvalidRequestError) as e:
        resolve_hyperparameters(hyper, extras, 10, None)
    assert e.value.param == param


def test_auto_hyperparameters():
    hp = resolve_hyperparameters({"n_epochs": "auto"}, {"target_modules": "all"}, 45, 7)
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier, hp.seed) == (3, 4, 1.0, 7)
    assert hp.target_modules == TARGET_MODULES and hp.lora_alpha == 16.0


def test_cli_malformed_file_is_one_line(tmp_path, capsys):
    from tokenmill.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_bytes(jsonl(fixed_reply_examples(2)) + b"{oops\n")
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenmill: error: line 3:") and "\n" not in err


@pytest.mark.slow
def test_cli_finetune_writes_a_peft_folder(tiny_chat_model, tmp_path, capsys):
    from tokenmill.cli import main

    path, tok, _ = tiny_chat_model
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(fixed_reply_examples(4)))
    out = tmp_path / "adapter"
    assert main(["finetune", "--model", path, "--tokenizer", tok, "--dtype", "float32", "--max-model-len", "256",
                 "--data", str(data), "--out", str(out), "--n-epochs", "1", "--batch-size", "2", "--lora-rank", "4",
                 "--target-modules", "q_proj", "down_proj", "--suffix", "cli"]) == 0
    cap = capsys.readouterr()
    assert "Step 2/2: training loss=" in cap.err and "written to" in cap.out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["down_proj", "q_proj"]


def test_service_temp_dir_is_made_on_first_upload_and_removed_on_close(tmp_path):
    """Without --finetune-dir a server makes no directory until a file is uploaded, and removes it when it
    stops; a --finetune-dir given by the user is kept."""
    from tokenmill.finetune.service import FineTuneService

    svc = FineTuneService(None, None, "m")
    assert svc._root is None  # nothing on disk for a server that never fine-tunes
    fid = svc.upload(jsonl(fixed_reply_examples(2)), "a.jsonl", "fine-tune")["id"]
    root = svc.root
    assert os.path.isfile(os.path.join(root, "files", fid + ".jsonl"))
    svc.close()
    assert not os.path.exists(root)
    kept = FineTuneService(None, str(tmp_path / "ft"), "m")
    kept.upload(jsonl(fixed_reply_examples(2)), "a.jsonl", "fine-tune")
    kept.close()
    assert os.path.isdir(tmp_path / "ft" / "files")


def test_lists_are_newest_first_within_one_second():
    """Files and jobs made in the same second (created_at has second resolution) still list newest first."""
    from tokenmill.finetune.service import FineTuneService, Job

    svc = FineTuneService(None, None, "m")
    ids = [svc.upload(jsonl(fixed_reply_examples(2)), f"{i}.jsonl", "fine-tune")["id"] for i in range(3)]
    assert [f["id"] for f in svc.list_files()["data"]] == ids[::-1]
    from tokenmill.finetune.trainer import Hyperparameters

    hp = Hyperparameters(n_epochs=1, batch_size=1, learning_rate_multiplier=1.0)
    for i in range(3):  # what create_job records, in creation order, all in one second
        svc.jobs[f"ftjob-{i}"] = Job(f"ftjob-{i}", "m", ids[0], hp, None, 0, f"ft:m::{i}", "/nowhere", created_at=7)
    assert [j["id"] for j in svc.list_jobs(None, 10)["data"]] == ["ftjob-2", "ftjob-1", "ftjob-0"]
    svc.close()
