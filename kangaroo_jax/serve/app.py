"""The FastAPI app: OpenAI routes, server-sent events, uploads and the static page.

  POST /v1/chat/completions   OpenAI chat completions (protocol.py); `stream: true` answers as server-sent events
  GET  /v1/models             the one served model
  GET  /health                {"status": "ok", ...}
  GET  /v1/stats              the batcher's counters (engine calls, rows per call, waiting requests)
  POST /v1/uploads            multipart `file` -> {"id", "filename", "url"}: a file:// URL to use in video_url
  GET  /v1/examples           the --examples videos, as {"name", "url"}
  GET  /                      the web page (static/index.html, no external resources)
Every error is OpenAI's JSON shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from kangaroo_jax.serve.batcher import Job
from kangaroo_jax.serve.errors import ApiError, bad_request
from kangaroo_jax.serve.prepare import prepare
from kangaroo_jax.serve.protocol import parse_chat_request
from kangaroo_jax.serve.service import Service

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
UPLOAD_CHUNK = 1 << 20
UPLOAD_OVERHEAD = 64 << 10  # multipart headers and boundaries around the file, at most


def _error_response(e: ApiError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status)


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None) -> str:
  body = {
      "id": cid,
      "object": "chat.completion.chunk",
      "created": created,
      "model": model,
      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
  }
  return f"data: {json.dumps(body)}\n\n"


def create_app(service: Service) -> FastAPI:
  @contextlib.asynccontextmanager
  async def lifespan(app):
    service.start()
    try:
      yield
    finally:
      service.stop()

  app = FastAPI(title="kangaroo_jax", lifespan=lifespan, docs_url=None, redoc_url=None)
  app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
  name = service.options.model_name

  @app.exception_handler(ApiError)
  async def api_error(request, e: ApiError):
    return _error_response(e)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request, e):
    return _error_response(ApiError(e.status_code, str(e.detail), type="invalid_request_error"))

  @app.exception_handler(RequestValidationError)
  async def validation_error(request, e):
    return _error_response(bad_request(f"bad request: {e.errors()[:3]}"))

  @app.get("/")
  async def page():
    return FileResponse(os.path.join(STATIC_DIR, "index.html"))

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": name, "pending": service.batcher.pending()}

  @app.get("/v1/models")
  async def models():
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": service.created, "owned_by": "kangaroo_jax"}],
    }

  @app.get("/v1/stats")
  async def stats():
    return dict(
        service.batcher.stats_dict(), visual_cache_hits=service.cache.hits, videos_decoded=service.cache.decodes
    )

  @app.get("/v1/examples")
  async def examples():
    return {"data": service.examples()}

  @app.post("/v1/uploads")
  async def upload(request: Request):
    limit = service.options.max_upload_bytes
    too_big = ApiError(
        413, f"the upload is larger than {limit} bytes (--max-upload-mb)", param="file", code="file_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + UPLOAD_OVERHEAD:
      raise too_big  # before the body is read (the multipart parser would spool all of it first)
    try:
      form = await request.form()
    except Exception as e:  # a body that is not multipart form data
      raise bad_request(f"the upload must be multipart/form-data with a 'file' field: {e}", "file") from None
    file = form.get("file")
    if not isinstance(file, UploadFile):
      raise bad_request("the upload must be multipart/form-data with a 'file' field", "file")
    ext = os.path.splitext(file.filename or "")[1].lower()
    ext = ext if re.fullmatch(r"\.[a-z0-9]{1,8}", ext) else ".bin"
    path = os.path.join(service.upload_dir, uuid.uuid4().hex + ext)
    size = 0
    partial = path + ".part"  # renamed when complete, so a cut-off upload is never used
    try:
      with open(partial, "wb") as out:
        while chunk := await file.read(UPLOAD_CHUNK):
          size += len(chunk)
          if size > limit:
            raise too_big
          out.write(chunk)
      os.replace(partial, path)
    finally:
      if os.path.exists(partial):
        os.remove(partial)
    return {"id": os.path.basename(path), "filename": file.filename, "bytes": size, "url": "file://" + path}

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    try:
      body = await request.json()
    except (ValueError, UnicodeDecodeError):
      raise bad_request("the request body is not valid JSON") from None
    req = parse_chat_request(body, service.options.defaults)
    prepared = await run_in_threadpool(
        prepare,
        req,
        service.chat,
        num_frames=service.options.num_frames,
        cache=service.cache,
        tmp_root=service.tmp_root,
    )
    job = Job(prepared, asyncio.get_running_loop(), service.tokenizer)
    service.batcher.submit(job)
    cid, created, model = "chatcmpl-" + uuid.uuid4().hex, int(time.time()), req.model or name
    usage = lambda: {
        "prompt_tokens": len(prepared.ids),
        "completion_tokens": len(job.tokens),  # noqa: E731
        "total_tokens": len(prepared.ids) + len(job.tokens),
    }
    if not req.stream:
      try:
        while True:
          kind, value = await job.events.get()
          if kind == "error":
            raise value
          if kind == "end":
            break
      finally:
        job.cancelled = True  # a no-op once finished; drops the job if the client went away first
      text = service.tokenizer.decode(job.tokens, skip_special_tokens=True)
      return {
          "id": cid,
          "object": "chat.completion",
          "created": created,
          "model": model,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": value}],
          "usage": usage(),
      }

    async def events():
      try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""}, None)
        while True:
          kind, value = await job.events.get()
          if kind == "text":
            yield _chunk(cid, created, model, {"content": value}, None)
          elif kind == "end":
            yield _chunk(cid, created, model, {}, value)
            if req.include_usage:
              yield "data: " + json.dumps(
                  {
                      "id": cid,
                      "object": "chat.completion.chunk",
                      "created": created,
                      "model": model,
                      "choices": [],
                      "usage": usage(),
                  }
              ) + "\n\n"
            break
          else:
            yield f"data: {json.dumps(value.body())}\n\n"
            break
        yield "data: [DONE]\n\n"
      finally:
        job.cancelled = True

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )

  return app
