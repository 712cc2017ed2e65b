"""OpenAI's files and fine-tuning routes over a FineTuneService (tokenmill/finetune/service.py):
POST/GET /v1/files, GET /v1/files/{id}, POST/GET /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs/{id},
GET /v1/fine_tuning/jobs/{id}/events, POST /v1/fine_tuning/jobs/{id}/cancel."""
from __future__ import annotations

import json
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tokenmill.errors import InvalidRequestError

FINETUNE_ROUTES = ("/v1/files", "/v1/fine_tuning/jobs")


def _limit(value: Optional[str], default: int = 20) -> int:
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 100:
        raise InvalidRequestError("limit must be an integer in [1, 100]", param="limit")
    return n


def add_finetune_routes(app: FastAPI, service: Any) -> None:
    @app.post("/v1/files")
    async def upload_file(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise InvalidRequestError("upload the file as multipart/form-data with fields `file` and `purpose`",
                                      param="file")
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidRequestError("the form has no `file` part", param="file")
        purpose = form.get("purpose")
        data = await upload.read()
        return JSONResponse(service.upload(data, upload.filename or "", purpose if isinstance(purpose, str)
                                           else None))

    @app.get("/v1/files")
    async def list_files(purpose: Optional[str] = None) -> JSONResponse:
        return JSONResponse(service.list_files(purpose))

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str) -> JSONResponse:
        return JSONResponse(service.get_file(file_id))

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"malformed JSON body: {e}") from None
        return JSONResponse(await service.create_job(body))

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: Optional[str] = None, limit: Optional[str] = None) -> JSONResponse:
        return JSONResponse(service.list_jobs(after, _limit(limit)))

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str) -> JSONResponse:
        return JSONResponse(service.get_job(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, after: Optional[str] = None, limit: Optional[str] = None) -> JSONResponse:
        return JSONResponse(service.events(job_id, after, _limit(limit)))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str) -> JSONResponse:
        return JSONResponse(service.cancel(job_id))
