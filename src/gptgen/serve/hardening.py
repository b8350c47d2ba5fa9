"""The server under hostile or broken clients: timeouts, one log line per dropped client, 400s, fair admission.

- `TimedH11Protocol(header_timeout, body_timeout)`: uvicorn's h11 protocol with a deadline for a request's
  headers (from the connection's first byte, or the end of the previous response) and for its body (from the
  end of its headers). A connection that misses one is closed with one log line (slowloris clients hold no
  connection longer than the timeout). uvicorn has no such timeouts itself.
- `harden(app)`: a client that goes away mid-body is one log line (not two tracebacks); an error of gptgen's
  raised while answering (a prompt that is not valid Unicode, say) is a 400 in OpenAI's shape, not a 500.
- `admit(engine, prompts)`: a request whose prompts can never fit the engine's queue is a 400; one that does
  not fit now is a 429 before any of its prompts is queued, so it never pushes other clients' requests out.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("gptgen.serve")

DEFAULT_HEADER_TIMEOUT = 10.0  # seconds for a request's headers
DEFAULT_BODY_TIMEOUT = 30.0  # seconds for its body, once the headers are in


def timed_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT, body_timeout: float = DEFAULT_BODY_TIMEOUT):
    """An uvicorn HTTP protocol class (uvicorn.run(..., http=cls)) enforcing the two timeouts."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            self._deadline: asyncio.TimerHandle | None = None
            self._waiting_for: str | None = None
            super().connection_made(transport)
            self._arm("headers")

        def data_received(self, data: bytes) -> None:
            if self._waiting_for is None and (self.cycle is None or self.cycle.response_complete):
                self._arm("headers")  # a keep-alive connection starts its next request (not while answering)
            super().data_received(data)
            self._progress()

        def _progress(self) -> None:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return  # still reading headers (the first request or the next one)
            if cycle.more_body:
                if self._waiting_for != "body":
                    self._arm("body")
            elif self._waiting_for is not None:
                self._disarm()  # the whole request is in: the app takes it from here

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # uvicorn's keep-alive timeout covers the idle time until the next request

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, what: str) -> None:
            self._disarm()
            seconds = header_timeout if what == "headers" else body_timeout
            self._waiting_for = what
            self._deadline = self.loop.call_later(seconds, self._expire, what, seconds)

        def _disarm(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
            self._deadline = None
            self._waiting_for = None

        def _expire(self, what: str, seconds: float) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            client = "%s:%d" % self.client if self.client else "a client"
            log.warning("closed the connection of %s: no complete request %s within %g s", client, what, seconds)
            if self.cycle is not None:
                self.scope["gptgen.timed_out"] = True  # the app's dropped-client line would repeat this one
                self.cycle.disconnected = True
                self.cycle.message_event.set()  # an app waiting for the body sees the client gone
            self.transport.close()

    TimedH11Protocol.__name__ = "TimedH11Protocol"
    return TimedH11Protocol


class _DroppedClients:
    """Pure ASGI middleware: a request whose client disconnected before its body was read is ended quietly
    with one log line (the app's exception for it would otherwise be logged with tracebacks)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"bytes": 0, "done": False, "dropped": False}

        async def tracking_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and not state["done"]:
                state["dropped"] = True
            return message

        from starlette.requests import ClientDisconnect

        try:
            await self.app(scope, tracking_receive, send)
        except (ClientDisconnect, OSError, asyncio.CancelledError) as exc:
            if not state["dropped"] and not isinstance(exc, ClientDisconnect):
                raise
            if scope.get("gptgen.timed_out"):
                return  # the protocol logged the timeout
            client = scope.get("client")
            who = "%s:%d" % tuple(client) if client else "a client"
            log.warning("client %s went away after %d bytes of the request body to %s %s", who, state["bytes"],
                        scope.get("method", ""), scope.get("path", ""))


def harden(app) -> None:
    """Install the dropped-client middleware and the 400 for gptgen's errors on a FastAPI app (before it starts)."""
    from fastapi.responses import JSONResponse

    from ..errors import GptgenError
    from .errors import error_body

    async def _gptgen_error(request, exc: GptgenError):
        return JSONResponse(error_body(400, str(exc), code="invalid_value"), status_code=400)

    app.add_exception_handler(GptgenError, _gptgen_error)
    app.add_middleware(_DroppedClients)


def admit(engine, prompts: int) -> None:
    """APIError 400 when `prompts` can never fit the engine's queue, 429 when they do not fit now; checked before
    any is queued (the app submits on its one event-loop thread, so nothing else is queued in between)."""
    from .errors import APIError

    limit = getattr(engine, "max_queue", None)
    if limit is None:
        return
    if prompts > limit:
        raise APIError(400, f"The request holds {prompts:,} prompts, more than this server's queue of {limit:,} can "
                            f"ever hold; send at most {limit:,} prompts a request.", param="prompt",
                       code="too_many_prompts")
    try:
        waiting = int(engine.stats().get("queue_depth", 0))
    except Exception:  # an engine without stats: its submit refuses what does not fit
        return
    if waiting + prompts > limit:
        raise APIError(429, f"The queue holds {waiting:,} of {limit:,} waiting requests, no room for this "
                            f"request's {prompts:,} prompt(s); retry later.", code="queue_full",
                       headers={"Retry-After": "1"})
