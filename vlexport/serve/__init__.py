"""`vlexport serve`: an OpenAI-compatible chat-completions server over one bundle and its bank tasks.

    serve("bank/", port=8000)                 # blocking; uvicorn handles SIGINT/SIGTERM (drain, then stop)
    app = create_app("bank/", max_batch=4)    # a FastAPI app, for tests or for another ASGI server
    python -m vlexport.serve bank/ --port 8000

Models: the bundle's directory name is the base (what `vlexport run` does without --task); each task is a model
of its own name. One worker thread owns the ONNX Runtime sessions and batches decode steps per task (scheduler.py).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import VlexportError
from .app import create_app

__all__ = ["create_app", "serve"]


def serve(
    bundle: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 4,
    max_queue: int = 64,
    max_image_bytes: int = 20_000_000,
    allow_local_images: bool = False,
    threads: int | None = None,
    request_timeout_s: float = 120.0,
    log=print,
    *,
    max_image_pixels: int = 50_000_000,
    default_max_tokens: int = 256,
    name: str | None = None,
) -> None:
    """Serve `bundle` on http://host:port until SIGINT/SIGTERM. On the signal uvicorn stops accepting connections,
    the requests in flight finish (up to request_timeout_s), then the worker stops. Raises VlexportError for a
    bundle that cannot be served (before binding the port)."""
    import uvicorn

    app = create_app(bundle, max_batch=max_batch, max_queue=max_queue, max_image_bytes=max_image_bytes,
                     max_image_pixels=max_image_pixels, allow_local_images=allow_local_images, threads=threads,
                     request_timeout_s=request_timeout_s, default_max_tokens=default_max_tokens, name=name, log=log)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(request_timeout_s) + 5)
    server = uvicorn.Server(config)
    log(f"vlexport serve: starting on http://{host}:{port} (OpenAI API at /v1, /health, /metrics)")
    try:
        server.run()
    except SystemExit:
        if not server.started:  # uvicorn exits with its own code when it cannot bind; its log says why
            raise VlexportError(f"vlexport serve could not listen on {host}:{port} (the error above says why: "
                                "another process on that port, or an address this machine does not have); "
                                "choose another --port or --host") from None
        raise
