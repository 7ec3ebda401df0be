"""The HTTP side: FastAPI routes in OpenAI's chat-completions shapes over one bundle and one Scheduler.

Requests are parsed and their images decoded on a small thread pool; only the scheduler's worker thread runs ONNX
Runtime. Each request gets an asyncio queue that the worker feeds (through call_soon_threadsafe) with Tokens, then
Done or Failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import VlexportError
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .protocol import Limits, RequestError, RequestParser, error_body
from .scheduler import Done, Failed, Job, QueueFull, Scheduler, Stopped, Tokens

# Text around an image: the body may be up to the image's base64 plus this much.
_BODY_SLACK = 1_000_000


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(
    bundle_or_path,
    *,
    max_batch: int = 4,
    max_queue: int = 64,
    max_image_bytes: int = 20_000_000,
    max_image_pixels: int = 50_000_000,
    allow_local_images: bool = False,
    threads: int | None = None,
    request_timeout_s: float = 120.0,
    default_max_tokens: int = 256,
    name: str | None = None,
    log=print,
) -> FastAPI:
    """An OpenAI-compatible app over one bundle (a path, or a loaded vlexport Bundle).

    `name` is the model name of the base (default: the bundle directory's name); each bank task is a model of its
    own name. The worker thread starts and stops with the app's lifespan; stopping drains what is running."""
    from ..runtime import Bundle

    if max_batch < 1:
        raise VlexportError(f"--max-batch must be at least 1 (got {max_batch})")
    if max_queue < 0:
        raise VlexportError(f"--max-queue must be at least 0 (got {max_queue})")
    if request_timeout_s <= 0:
        raise VlexportError(f"--request-timeout must be positive (got {request_timeout_s})")
    bundle = bundle_or_path if isinstance(bundle_or_path, Bundle) else Bundle(bundle_or_path, threads=threads)
    name = name or Path(bundle.path).resolve().name
    if not bundle.chat_template:
        raise VlexportError(f"bundle '{bundle.path}' has no chat template, which vlexport serve needs to turn chat "
                            "messages into a prompt; rebuild it from a base directory with chat_template.jinja")
    if name in bundle.tasks:
        raise VlexportError(f"the base's model name '{name}' is also a task of bundle '{bundle.path}'; "
                            "give the base another name with --name")
    limits = Limits(max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
                    allow_local_images=allow_local_images, default_max_tokens=default_max_tokens)
    parser = RequestParser(bundle, name, limits)
    metrics = Metrics(max_batch)
    scheduler = Scheduler(bundle, max_batch=max_batch, max_queue=max_queue, metrics=metrics, log=log)
    models = parser.models()
    created = int(time.time())
    manifest_file = Path(bundle.path) / "manifest.json"
    digest = hashlib.sha256(manifest_file.read_bytes()).hexdigest()[:12] if manifest_file.exists() else "unsealed"
    fingerprint = f"vlexport-{__version__}-{digest}"  # changes when the bundle does
    state = {"draining": False, "latency_ewma": None}
    # Decoding images and tokenizing run beside the worker; a few threads are enough and keep the cores for it.
    parse_limiter = anyio.CapacityLimiter(4)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        log(f"vlexport serve: bundle {bundle.path} as models {', '.join(models)}; max_batch {max_batch}, "
            f"max_queue {max_queue}")
        try:
            yield
        finally:
            state["draining"] = True
            await anyio.to_thread.run_sync(scheduler.stop, True, request_timeout_s + 10)
            log("vlexport serve: stopped")

    app = FastAPI(title="vlexport serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.bundle, app.state.base_name = scheduler, metrics, bundle, name

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if exc.status_code != 404 else f"unknown request URL: {request.method} {request.url.path}"
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(message), "invalid_request_error", None, code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log(f"vlexport serve: internal error on {request.url.path}: {type(exc).__name__}: {exc}")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", None,
                                       "internal_error"), status_code=500)

    def model_card(model: str, task: str | None) -> dict:
        info = bundle.tasks.get(task) or {} if task else {}
        return {"id": model, "object": "model", "created": created, "owned_by": "vlexport",
                "vlexport": {"task": task, "prefix_tokens": info.get("prefix_tokens", 0),
                             "kinds": sorted({a["kind"] for a in info.get("adapters", [])})}}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(m, t) for m, t in models.items()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        if model_id not in models:
            return _error(RequestError(404, f"the model '{model_id}' does not exist on this server; it serves: "
                                            f"{', '.join(models)}", param="model", code="model_not_found"))
        return model_card(model_id, models[model_id])

    @app.get("/health")
    async def health():
        ok = scheduler.alive and not state["draining"]
        body = {"status": "ok" if ok else ("draining" if state["draining"] else "worker stopped"),
                "models": list(models), "queue_depth": scheduler.queued, "active_rows": scheduler.active,
                "max_batch": max_batch, "max_queue": max_queue}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    def retry_after() -> str:
        ewma = state["latency_ewma"] or 1.0
        return str(min(60, max(1, math.ceil(ewma * (scheduler.queued + 1) / max_batch))))

    def queue_full(why: str) -> RequestError:
        metrics.dropped.labels(reason="queue_full").inc()
        return RequestError(429, f"the server is busy: {why}; retry later", code="queue_full", type="rate_limit_error",
                            headers={"Retry-After": retry_after()})

    async def read_body(request: Request) -> bytes:
        """The body, up to the limit. Past it the rest is read and dropped (up to 4x the limit), so that the client,
        still sending, gets the 413 instead of a reset connection."""
        limit = max_image_bytes * 4 // 3 + _BODY_SLACK
        too_big = RequestError(413, f"the request body is larger than this server's limit of {limit} bytes "
                                    f"(images up to {max_image_bytes} bytes)", code="request_too_large")
        length = request.headers.get("content-length")
        declared = int(length) if length and length.isdigit() else None
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > 4 * limit:
                break
            if n <= limit and (declared is None or declared <= limit):
                chunks.append(chunk)
        if n > limit or (declared is not None and declared > limit):
            raise too_big
        return b"".join(chunks)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        label = "unknown"
        try:
            if state["draining"]:
                raise RequestError(503, "the server is shutting down", code="server_shutdown", type="server_error")
            raw = await read_body(request)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
            if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"] in models:
                label = body["model"]
            if scheduler.queued >= max_queue + max_batch:
                raise queue_full(f"{scheduler.queued} requests are waiting")
            try:
                req = await anyio.to_thread.run_sync(parser.parse, body, limiter=parse_limiter)
            except VlexportError as e:  # the runtime's own checks (e.g. the image placeholder count)
                raise RequestError(400, str(e), param="messages") from None
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            job = Job(id=f"chatcmpl-{uuid.uuid4().hex}", request=req,
                      sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                      deadline=arrived + request_timeout_s, created=arrived)
            try:
                scheduler.submit(job)
            except QueueFull as e:
                raise queue_full(str(e)) from None
            except Stopped:
                raise RequestError(503, "the server is shutting down", code="server_shutdown", type="server_error")
        except RequestError as e:
            metrics.requests.labels(model=label, status=str(e.status)).inc()
            return _error(e)
        if req.stream:
            metrics.requests.labels(model=label, status="200").inc()
            return StreamingResponse(stream(job, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(job, events, request, label)

    async def next_event(job: Job, events: asyncio.Queue):
        """The worker's next event; a backstop timeout in case the worker itself is stuck."""
        left = job.deadline - time.monotonic() + 10
        try:
            return await asyncio.wait_for(events.get(), timeout=max(0.1, left))
        except asyncio.TimeoutError:
            job.cancel()
            return Failed(504, "the request did not finish within the server's timeout", "timeout", "timeout")

    def note_latency(job: Job) -> None:
        dt = time.monotonic() - job.created
        state["latency_ewma"] = dt if state["latency_ewma"] is None else 0.8 * state["latency_ewma"] + 0.2 * dt

    async def complete(job: Job, events: asyncio.Queue, request: Request, label: str):
        """Wait for Done or Failed; every half second, see whether the client is still there."""
        waiter = asyncio.ensure_future(next_event(job, events))
        check_at = time.monotonic() + 0.5
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=max(0.0, check_at - time.monotonic()))
                if time.monotonic() >= check_at:
                    check_at = time.monotonic() + 0.5
                    if await request.is_disconnected():
                        job.cancel()
                        metrics.requests.labels(model=label, status="499").inc()
                        return Response(status_code=499)
                if not done:
                    continue
                ev = waiter.result()
                if isinstance(ev, Tokens):
                    waiter = asyncio.ensure_future(next_event(job, events))
                    continue
                if isinstance(ev, Failed):
                    metrics.requests.labels(model=label, status=str(ev.status)).inc()
                    return JSONResponse(error_body(ev.message, ev.type, None, ev.code), status_code=ev.status)
                note_latency(job)
                metrics.requests.labels(model=label, status="200").inc()
                return completion(job, ev)
        finally:
            if not waiter.done():
                waiter.cancel()
                job.cancel()

    def usage(ev: Done) -> dict:
        n = len(ev.token_ids)
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": n, "total_tokens": ev.prompt_tokens + n}

    def completion(job: Job, ev: Done) -> dict:
        r = job.request
        return {
            "id": job.id, "object": "chat.completion", "created": int(time.time()), "model": r.model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ev.text, "refusal": None},
                         "logprobs": None, "finish_reason": ev.finish_reason}],
            "usage": usage(ev),
            "vlexport": {"task": r.task, "token_ids": ev.token_ids, "prompt_tokens": ev.prompt_tokens,
                         "timings": ev.timings},
        }

    def chunk(job: Job, delta: dict, finish_reason=None, **extra) -> str:
        body = {"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": job.request.model, "system_fingerprint": fingerprint,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    async def stream(job: Job, events: asyncio.Queue):
        finished = False
        try:
            yield chunk(job, {"role": "assistant", "content": ""})
            while True:
                ev = await next_event(job, events)
                if isinstance(ev, Tokens):
                    yield chunk(job, {"content": ev.text}, vlexport={"token_ids": ev.ids})
                elif isinstance(ev, Done):
                    note_latency(job)
                    yield chunk(job, {}, ev.finish_reason,
                                vlexport={"token_ids": [], "task": job.request.task, "timings": ev.timings})
                    if job.request.include_usage:
                        body = {"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": job.request.model, "system_fingerprint": fingerprint, "choices": [],
                                "usage": usage(ev)}
                        yield f"data: {json.dumps(body)}\n\n"
                    finished = True
                    yield "data: [DONE]\n\n"
                    return
                else:
                    finished = True
                    yield f"data: {json.dumps(error_body(ev.message, ev.type, None, ev.code))}\n\n"
                    return
        finally:
            if not finished:  # the client went away: free the row
                job.cancel()

    return app
