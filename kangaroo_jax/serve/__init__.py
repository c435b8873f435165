"""An OpenAI-compatible HTTP server for a Kangaroo checkpoint, with a small web page.

    python -m kangaroo_jax.serve CKPT_DIR [--host 127.0.0.1 --port 8000 --num-frames 64 ...]

Modules, one job each: `protocol` (request JSON -> ChatRequest, OpenAI-style errors), `media` (video / image
URLs -> normalised frames, with a cache of encoded videos), `prepare` (ChatRequest -> prompt ids + visual input,
length checks), `batcher` (the bounded queue and the worker that batches compatible requests into the KV-cache
engine), `app` (the FastAPI routes, server-sent events, uploads, the page in `static/`).
Importing this package needs no web framework; `app` and `__main__` do (the `[serve]` extra).
"""
