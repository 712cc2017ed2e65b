"""The API side of fine-tuning: OpenAI's files and fine-tuning jobs, kept in this process; training runs in
the engine (tokenmill/finetune/engine.py), reached through the EngineClient's `finetune_submit` /
`finetune_cancel`, whose updates come back to `on_updates` on the event loop.

A succeeded job's adapter is a PEFT folder under <finetune_dir>/adapters/<job id>; `register_adapter(name,
path)` (given by the server) makes it servable as its `fine_tuned_model` name. Files and jobs live in memory
(uploaded files also on disk): a restarted server forgets them, the adapter folders stay.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.finetune.data import parse_chat_jsonl
from tokenmill.finetune.jobs import TERMINAL, JobEvent, JobUpdate, check_suffix, resolve_hyperparameters
from tokenmill.finetune.offline import fine_tuned_name, make_spec, new_job_id
from tokenmill.finetune.trainer import Hyperparameters

logger = logging.getLogger(__name__)
JOB_FIELDS = {"model", "training_file", "hyperparameters", "suffix", "seed", "validation_file", "lora_rank",
              "lora_alpha", "target_modules", "integrations", "metadata"}


class NotFoundError(TokenmillError):
    http_status = 404
    error_type = "invalid_request_error"


@dataclass
class StoredFile:
    id: str
    filename: str
    bytes: int
    created_at: int
    path: str
    examples: list = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": "fine-tune", "status": "processed", "status_details": None}


@dataclass
class Job:
    id: str
    model: str
    training_file: str
    hp: Hyperparameters
    suffix: Optional[str]
    seed: int
    name: str  # the fine_tuned_model it will have
    out_dir: str
    metadata: Optional[dict] = None
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "validating_files"
    finished_at: Optional[int] = None
    trained_tokens: Optional[int] = None
    error: Optional[dict] = None
    fine_tuned_model: Optional[str] = None
    events: list[dict] = field(default_factory=list)  # oldest first
    steps: int = 0
    total_steps: int = 0

    def add_event(self, ev: JobEvent) -> None:
        self.events.append({"object": "fine_tuning.job.event", "id": f"ftevent-{uuid.uuid4().hex[:24]}",
                            "created_at": ev.created_at, "level": ev.level, "message": ev.message,
                            "data": ev.data, "type": ev.type})

    def to_dict(self) -> dict[str, Any]:
        hp = self.hp
        return {"object": "fine_tuning.job", "id": self.id, "model": self.model, "created_at": self.created_at,
                "finished_at": self.finished_at, "fine_tuned_model": self.fine_tuned_model,
                "organization_id": "tokenmill", "result_files": [], "status": self.status,
                "validation_file": None, "training_file": self.training_file,
                "hyperparameters": {"n_epochs": hp.n_epochs, "batch_size": hp.batch_size,
                                    "learning_rate_multiplier": hp.learning_rate_multiplier},
                "trained_tokens": self.trained_tokens, "error": self.error, "seed": self.seed,
                "estimated_finish": None, "integrations": [], "metadata": self.metadata, "user_provided_suffix":
                self.suffix, "method": {"type": "supervised", "supervised": {"hyperparameters": {
                    "n_epochs": hp.n_epochs, "batch_size": hp.batch_size,
                    "learning_rate_multiplier": hp.learning_rate_multiplier}}},
                # tokenmill extras
                "lora": {"rank": hp.lora_rank, "alpha": hp.lora_alpha, "target_modules": list(hp.target_modules)},
                "adapter_path": self.out_dir if self.status == "succeeded" else None,
                "steps": self.steps, "total_steps": self.total_steps}


def _page(items: list[dict], after: Optional[str], limit: int, param: str = "after") -> dict[str, Any]:
    if after is not None:
        ids = [x["id"] for x in items]
        if after not in ids:
            raise InvalidRequestError(f"no item with id {after!r}", param=param)
        items = items[ids.index(after) + 1:]
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


class FineTuneService:
    def __init__(self, engine: Any, root: Optional[str], model_name: str,
                 register_adapter: Optional[Callable[[str, str], Any]] = None):
        """root: where uploads and adapters are kept (--finetune-dir, kept after the server stops). None: a
        temporary directory, made on the first upload and removed by close() when the server stops."""
        self.engine, self.model_name = engine, model_name
        self._root, self._owns_root = root, root is None
        self.register_adapter = register_adapter
        self.files: dict[str, StoredFile] = {}
        self.jobs: dict[str, Job] = {}
        self._listening = False

    @property
    def root(self) -> str:
        if self._root is None:
            self._root = tempfile.mkdtemp(prefix="tokenmill-finetune-")
        for sub in ("files", "adapters"):
            os.makedirs(os.path.join(self._root, sub), exist_ok=True)
        return self._root

    def close(self) -> None:
        """Remove the temporary directory (never a --finetune-dir)."""
        if self._owns_root and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    # ---- files ---------------------------------------------------------------------------------
    def upload(self, data: bytes, filename: str, purpose: Optional[str]) -> dict[str, Any]:
        if purpose != "fine-tune":
            raise InvalidRequestError("purpose must be \"fine-tune\" (the only purpose this server stores)",
                                      param="purpose")
        examples = parse_chat_jsonl(data, param="file")  # every line checked; a bad one is a 400 naming it
        fid = f"file-{uuid.uuid4().hex[:24]}"
        path = os.path.join(self.root, "files", fid + ".jsonl")
        with open(path, "wb") as f:
            f.write(data)
        sf = StoredFile(fid, filename or "upload.jsonl", len(data), int(time.time()), path, examples)
        self.files[fid] = sf
        return sf.to_dict()

    def list_files(self, purpose: Optional[str] = None) -> dict[str, Any]:
        files = [f.to_dict() for f in reversed(self.files.values())]  # newest first, like jobs
        if purpose is not None:
            files = [f for f in files if f["purpose"] == purpose]
        return {"object": "list", "data": files, "has_more": False}

    def get_file(self, file_id: str) -> dict[str, Any]:
        return self._file(file_id, "file_id").to_dict()

    def _file(self, file_id: Any, param: str) -> StoredFile:
        sf = self.files.get(file_id) if isinstance(file_id, str) else None
        if sf is None:
            raise (NotFoundError if param == "file_id" else InvalidRequestError)(
                f"no file with id {file_id!r}", param=param)
        return sf

    # ---- jobs ----------------------------------------------------------------------------------
    async def create_job(self, body: Any) -> dict[str, Any]:
        if not hasattr(self.engine, "finetune_submit"):
            raise InvalidRequestError("fine-tuning runs inside one engine; this server's engine "
                                      f"({type(self.engine).__name__}, e.g. --data-parallel-size > 1) cannot train",
                                      param="model")
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object")
        unknown = sorted(set(body) - JOB_FIELDS)
        if unknown:
            raise InvalidRequestError(f"unsupported field(s) {unknown}", param=unknown[0])
        if body.get("model") != self.model_name:
            raise InvalidRequestError(f"model must be the served base model {self.model_name!r}", param="model")
        if body.get("validation_file") is not None:
            raise InvalidRequestError("validation files are not supported", param="validation_file")
        if body.get("integrations"):
            raise InvalidRequestError("integrations are not supported", param="integrations")
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict)
                                         and all(isinstance(v, str) for v in metadata.values())):
            raise InvalidRequestError("metadata must be an object of strings", param="metadata")
        sf = self._file(body.get("training_file"), "training_file")
        hyper = body.get("hyperparameters")
        if hyper is not None and not isinstance(hyper, dict):
            raise InvalidRequestError("hyperparameters must be an object", param="hyperparameters")
        extras = {k: body[k] for k in ("lora_rank", "lora_alpha", "target_modules") if k in body}
        hp = resolve_hyperparameters(hyper, extras, len(sf.examples), body.get("seed"))
        suffix = check_suffix(body.get("suffix"))
        job_id = new_job_id()
        job = Job(job_id, self.model_name, sf.id, hp, suffix, hp.seed,
                  fine_tuned_name(self.model_name, suffix, job_id), os.path.join(self.root, "adapters", job_id),
                  metadata=metadata)
        max_step = self.engine.config.finetune.finetune_max_step_tokens
        spec = await asyncio.to_thread(make_spec, self.engine.processor, sf.examples, hp, job_id, job.out_dir,
                                       self.model_name, job.name, max_step)  # a bad example: 400 naming its line
        self._listen()
        self.jobs[job_id] = job
        job.add_event(JobEvent(f"Validating training file: {sf.id}"))
        job.status = "queued"
        self.engine.finetune_submit(spec)
        return job.to_dict()

    def _listen(self) -> None:
        if not self._listening:
            self.engine.finetune_listen(self.on_updates)
            self._listening = True

    def list_jobs(self, after: Optional[str], limit: int) -> dict[str, Any]:
        jobs = [j.to_dict() for j in reversed(self.jobs.values())]  # newest first: insertion order, not the second-
        # resolution created_at (two jobs made in one second kept their creation order reversed)
        return _page(jobs, after, limit)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._job(job_id).to_dict()

    def events(self, job_id: str, after: Optional[str], limit: int) -> dict[str, Any]:
        return _page(list(reversed(self._job(job_id).events)), after, limit)

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self._job(job_id)
        if job.status in TERMINAL:
            raise InvalidRequestError(f"the job cannot be cancelled: it has ended ({job.status})",
                                      param="fine_tuning_job_id")
        self.engine.finetune_cancel(job_id)
        job.status, job.finished_at = "cancelled", int(time.time())
        job.add_event(JobEvent("Job cancellation requested"))
        return job.to_dict()

    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no fine-tuning job with id {job_id!r}", param="fine_tuning_job_id")
        return job

    # ---- engine updates ------------------------------------------------------------------------
    def on_updates(self, updates: list[JobUpdate]) -> None:
        for u in updates:
            job = self.jobs.get(u.job_id)
            if job is None:
                continue
            for ev in u.events:
                job.add_event(ev)
            if u.total_steps:
                job.trained_tokens, job.steps, job.total_steps = u.trained_tokens, u.steps, u.total_steps
            if job.status == "cancelled":
                continue  # cancellation wins over anything the engine did before it saw it
            job.status = u.status
            job.finished_at = u.finished_at or job.finished_at
            if u.error is not None:
                job.error = {"message": u.error.get("message"), "code": u.error.get("code"),
                             "param": u.error.get("param")}
            if u.status == "succeeded":
                job.fine_tuned_model = job.name
                self._register(job)

    def _register(self, job: Job) -> None:
        if self.register_adapter is None:
            logger.info("fine-tuned adapter %s saved to %s (not served: the server runs without --enable-lora)",
                        job.name, job.out_dir)
            job.add_event(JobEvent(f"Adapter saved to {job.out_dir}; not served (start the server with "
                                   "--enable-lora to serve fine-tuned models)", "warn"))
            return

        def failed(exc: BaseException) -> None:
            logger.error("registering adapter %s failed: %s", job.name, exc)
            job.add_event(JobEvent(f"Registering the adapter for serving failed: {exc}", "warn"))

        def done(task: "asyncio.Future") -> None:
            if task.cancelled() or task.exception() is not None:
                failed(task.exception() if not task.cancelled() else RuntimeError("cancelled"))
            else:
                job.add_event(JobEvent(f"Adapter {job.name} registered for serving"))

        try:
            res = self.register_adapter(job.name, job.out_dir)  # engine.add_lora may be a coroutine
        except Exception as exc:  # noqa: BLE001 - the adapter is saved either way
            failed(exc)
            return
        if asyncio.iscoroutine(res):
            asyncio.ensure_future(res).add_done_callback(done)
        else:
            job.add_event(JobEvent(f"Adapter {job.name} registered for serving"))
