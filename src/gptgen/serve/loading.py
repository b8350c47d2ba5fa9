"""Bind first, load after: an ASGI app that answers while the model loads.

`gptgen serve` binds its port at once and loads the model (and compiles the decode step, with --compile) in
a thread. Meanwhile `/health` answers 503 {"status": "loading"} (llama.cpp's convention) and every other
path 503 in OpenAI's error shape with Retry-After; once the real app (create_app) has started, everything
is handed to it and `/health` answers 200. A failed load stops the server; `error` then holds the reason.

For a load balancer: a TCP connect or any HTTP answer means the process is alive (liveness); `/health`
200 means it can take requests (readiness).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from typing import Callable

log = logging.getLogger("gptgen.serve")


class LoadingApp:
    """ASGI app: 503 while `build()` (run in a thread) makes the real app, then the real app."""

    def __init__(self, build: Callable[[], object], on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.build = build
        self.on_failure = on_failure  # default: stop the server (SIGTERM to this process)
        self.app = None          # the real app, once it has started
        self.error: BaseException | None = None
        self._lifespan = None
        self._task: asyncio.Task | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._run_lifespan(receive, send)
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return
        if scope.get("path") == "/health":
            body, status = {"status": "loading"}, 503
        else:
            body = {"error": {"message": "The model is still loading; retry shortly (GET /health answers 200 "
                                         "once it is ready).", "type": "server_error", "param": None,
                              "code": "model_loading"}}
            status = 503
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def _load(self) -> None:
        try:
            app = await asyncio.to_thread(self.build)
            lifespan = app.router.lifespan_context(app)
            await lifespan.__aenter__()
            self._lifespan = lifespan
            self.app = app
            log.info("the model is loaded; /health now answers 200")
        except BaseException as exc:  # noqa: BLE001 - any failure ends the server, with its reason kept
            self.error = exc
            log.error("loading the model failed: %s", exc)
            if self.on_failure is not None:
                self.on_failure(exc)
            else:
                os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down on SIGTERM; the caller reads .error

    async def _run_lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._task = asyncio.ensure_future(self._load())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._task is not None and not self._task.done():
                    self._task.cancel()
                if self._lifespan is not None:
                    await self._lifespan.__aexit__(None, None, None)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def wait_ready(self) -> None:
        """Until the real app has started (or loading failed)."""
        if self._task is not None:
            await asyncio.shield(self._task)
