"""python -m vlexport.serve BUNDLE [--host H] [--port N] ...: the same options `vlexport serve` takes."""

from __future__ import annotations

import argparse
import sys

from ..errors import VlexportError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlexport.serve",
                                description="Serve a vlexport bundle over OpenAI's chat-completions API.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (vlexport build -o)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=4, help="requests decoding at once (default 4)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429 (default 64)")
    p.add_argument("--max-image-bytes", type=int, default=20_000_000)
    p.add_argument("--max-image-pixels", type=int, default=50_000_000, help="decompression-bomb guard")
    p.add_argument("--allow-local-images", action="store_true", help="accept image_url as a local path or file:// URL")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds from arrival to the last token")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--name", default=None, help="model name of the base (default: the bundle directory's name)")
    a = p.parse_args(argv)
    from . import serve

    try:
        serve(a.bundle, host=a.host, port=a.port, max_batch=a.max_batch, max_queue=a.max_queue,
              max_image_bytes=a.max_image_bytes, allow_local_images=a.allow_local_images, threads=a.threads,
              request_timeout_s=a.request_timeout, log=lambda m: print(m, file=sys.stderr, flush=True),
              max_image_pixels=a.max_image_pixels, default_max_tokens=a.default_max_tokens, name=a.name)
    except VlexportError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
