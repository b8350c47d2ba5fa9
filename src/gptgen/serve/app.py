"""The OpenAI-compatible HTTP API and the playground, over the continuous-batching engine.

This module only translates: HTTP bodies to SamplingParams and engine submissions, engine TokenEvents
(delivered on the engine's thread) back to JSON or server-sent events on the event loop. Each request has
a deque the engine thread fills, and an asyncio.Event it sets through loop.call_soon_threadsafe when the
deque was empty; a task watching the connection cancels the engine request as soon as the client goes
away, so its slot is freed at the next decode step.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import time
import uuid
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import ChatTemplate, get_template, special_marker_id
from ..errors import GenerationError, GptgenError
from ..generation.batcher import token_text
from ..generation.config import check_option
from .errors import APIError, error_body
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, error_sentence

log = logging.getLogger("gptgen.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_BODY = 1 << 20  # bytes
COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI's /v1/completions
_SEARCH_ONLY = ("length_penalty", "early_stopping", "penalty_alpha")
MAX_JSON_DEPTH = 64  # a JSON schema in response_format nests; nothing else comes near


def create_app(lm, *, engine=None, max_batch: int = 16, max_queue: int = 256, api_key: str | None = None,
               cors: str | list[str] | None = None, served_model_name: str | None = None,
               chat_template: ChatTemplate | str | None = "auto", max_body_bytes: int = DEFAULT_MAX_BODY,
               max_context: int | None = None, compile: bool | None = None, prefix_caching: bool = True):
    """The FastAPI app serving `lm` (a LanguageModel): /v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics and the playground at /.

    The app builds a BatchEngine(lm, max_batch=, max_queue=, compile=) and runs it for its lifetime, unless
    an `engine` is passed (then the caller starts and closes it); with compile=True on CPU the engine's
    decode step is compiled (BatchEngine.warm_up) before the app takes requests. `api_key` guards /v1/*;
    `cors` lists the origins allowed to call the API from a browser (none by default). `chat_template` is a
    template object, a name of gptgen.chat.TEMPLATES (plain, kogpt2, chatml), the path of a Jinja file or model
    directory, "auto" (the model directory's Jinja chat_template, else the tokenizer's BOS/EOS) or None (chat
    refused); a name or path that does not work raises GenerationError here. prefix_caching=False turns off
    the reuse of a shared prompt prefix's KV (outputs are the same either way). Also /tokenize, /detokenize.
    """
    from ..generation.batcher import BatchEngine

    for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_body_bytes", max_body_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GptgenError(f"{name} must be a positive integer, got {value!r}.")
    owns_engine = engine is None
    if engine is None:
        engine = BatchEngine(lm, max_batch=max_batch, max_queue=max_queue, max_context=max_context,
                             compile=compile, prefix_caching=prefix_caching)
    model_name = served_model_name or "gptgen"
    template, template_error = None, None
    if chat_template is None:
        template_error = "This server has no chat template; use /v1/completions."
    elif chat_template == "auto":
        try:
            template = get_template(chat_template, lm.tokenizer)
        except GenerationError as exc:
            template_error = f"This model has no chat template, so /v1/chat/completions is unavailable: {exc}"
    else:  # a template asked for by name or path must work, or the server does not start
        template = get_template(chat_template, lm.tokenizer)
        template.end_markers  # noqa: B018  (refuses a template whose answers could never end)
    if isinstance(cors, str):
        cors = [cors]

    @asynccontextmanager
    async def lifespan(app):
        if owns_engine:
            if engine.compile_cpu:
                log.info("compiling the CPU decode step for batches 1..%d", engine.max_batch)
                log.info("compiled in %.1f s", engine.warm_up())
            engine.start()
        try:
            yield
        finally:
            if owns_engine:
                engine.close()

    app = FastAPI(title="gptgen", version=_version(), lifespan=lifespan, docs_url="/docs", redoc_url=None)
    context = getattr(engine, "max_context", None) or max_context or lm.config.n_positions
    state = _ServerState(lm, engine, model_name, template, template_error, api_key, max_body_bytes, context)
    app.state.gptgen = state
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    app.add_middleware(_StatusCounter, metrics=state.metrics)
    from .hardening import harden

    harden(app)  # clients gone mid-body: one log line; gptgen's errors: 400 (serve/hardening.py)

    # Errors: always OpenAI's shape, never a traceback --------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        message = {404: f"There is no {request.method} {request.url.path} on this server.",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(
            exc.status_code, str(exc.detail))
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log.exception("internal error answering %s (request %s)", request.url.path,
                      getattr(request.state, "request_id", "?"))
        return JSONResponse(error_body(500, "The server hit an internal error; see its log."), status_code=500)

    # Routes ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(engine.stats(), model_name),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models(request: Request):
        state.check_key(request)
        return {"object": "list", "data": [state.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        state.check_key(request)
        state.check_model(name)
        return state.model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        state.check_key(request)
        body = await state.read_json(request)
        req = state.validate(CompletionRequest, body)
        job = await state.completion_job(req, request)
        if req.stream:
            return _sse(StreamingResponse, job.stream_completion(request))
        return _answer(JSONResponse, await job.collect_completion(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state.check_key(request)
        body = await state.read_json(request)
        req = state.validate(ChatCompletionRequest, body)
        job = await state.chat_job(req, request)
        if req.stream:
            return _sse(StreamingResponse, job.stream_chat(request))
        return _answer(JSONResponse, await job.collect_chat(request))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's /tokenize: {"prompt": str} or {"messages": [...], "add_generation_prompt": bool} ->
        {"count", "max_model_len", "tokens", "token_strs"}."""
        state.check_key(request)
        body = await state.read_json(request)
        return await state.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        """vLLM's /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
        state.check_key(request)
        body = await state.read_json(request)
        return await state.detokenize(body)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _depth(value) -> int:
    """How deep lists and objects nest in parsed JSON (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:
                stack.extend((child, level + 1) for child in item if isinstance(child, (dict, list)))
    return deepest


def _answer(response_cls, body):
    # 499 (nginx's "client closed request"): counted in /metrics, read by nobody.
    return response_cls(body, status_code=200) if body is not None else response_cls(None, status_code=499)


def _sse(response_cls, chunks: AsyncIterator[str]):
    return response_cls(chunks, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _version() -> str:
    from .. import __version__

    return __version__


class _StatusCounter:
    """Pure ASGI middleware counting answered requests by path and status (streams untouched), and giving
    every request an id: the client's X-Request-Id (printable, at most 128 characters) or a new one, echoed
    in the response's X-Request-Id and written in the log line of the answer."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
                 "/detokenize", "/")

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in self.ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status = int(message["status"])
                self.metrics.count_request(endpoint, status)
                message = dict(message, headers=list(message.get("headers", [])) + [(b"x-request-id", rid.encode())])
                log.info("request %s: %s %s -> %d", rid, scope.get("method", ""), path, status)
            await send(message)

        await self.app(scope, receive, counting_send)


def _longest_token_bytes(tokenizer) -> int:
    try:
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    except (AttributeError, TypeError):
        return 64
    return max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=64)


def _request_id(scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1").strip()
            if 0 < len(text) <= 128 and text.isprintable():
                return text
            break
    return uuid.uuid4().hex


class _ServerState:
    """What the routes share: the model, the engine, the chat template, the key, the metrics."""

    def __init__(self, lm, engine, model_name, template, template_error, api_key, max_body, context) -> None:
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.engine = engine
        self.model_name = model_name
        self.template = template
        self.template_error = template_error
        self.api_key = api_key
        self.max_body = max_body
        self.context = context
        self.metrics = Metrics()
        self.created = int(time.time())
        # Twice the bytes `context` of the longest tokens: normalizers can drop characters before tokenizing.
        self.max_prompt_bytes = 2 * context * _longest_token_bytes(self.tokenizer) + 4096

    # Edge checks ----------------------------------------------------------------------------------
    def check_key(self, request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            message = ("The request has no API key; send it as 'Authorization: Bearer KEY'." if not header
                       else "The API key is not valid for this server.")
            raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gptgen",
                "max_model_len": self.context}

    async def read_json(self, request) -> dict[str, Any]:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media and media != "application/json" and not media.endswith("+json"):
            raise APIError(415, f"The request body must be JSON (Content-Type: application/json), got {media}.",
                           code="unsupported_media_type")
        limit = self.max_body
        length = request.headers.get("content-length")
        too_big = APIError(413, f"The request body is larger than this server's limit of {limit:,} bytes.")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_big
        too_deep = APIError(400, f"The request body nests JSON more than {MAX_JSON_DEPTH} levels deep.",
                            code="invalid_json")
        try:
            data = json.loads(raw)
        except RecursionError:
            raise too_deep from None
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        if _depth(data) > MAX_JSON_DEPTH:
            raise too_deep
        return data

    def validate(self, model_cls, body: dict[str, Any]):
        from pydantic import ValidationError

        try:
            req = model_cls.model_validate(body)
        except ValidationError as exc:
            message, param = error_sentence(exc)
            raise APIError(400, message, param=param, code="invalid_value") from None
        self.check_model(req.model)
        for name in _SEARCH_ONLY:  # options of beam / contrastive search: refused, never silently dropped
            if body.get(name) not in (None, False):
                try:  # a bad value gets GenerationConfig's sentence first, as in the API and the CLI
                    check_option(name, body[name])
                except GenerationError as exc:
                    raise APIError(400, str(exc), param=name, code="invalid_value") from None
                raise APIError(400, f"{name} belongs to beam or contrastive search, which the batching server "
                                    "does not run; use gptgen generate or LanguageModel.generate.", param=name)
        return req

    # Requests to jobs -----------------------------------------------------------------------------
    async def completion_job(self, req: CompletionRequest, http_request) -> "_Job":
        if req.suffix:
            raise APIError(400, "suffix (insertion) is not supported by this model.", param="suffix")
        texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
        self.check_prompt_bytes(texts, "prompt")
        # Off the event loop: a long prompt must not stall the streams being answered.
        prompts, texts = await asyncio.to_thread(self._completion_prompts, req.prompt)
        max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
        params = self._params(req, max_tokens=max_tokens, logprobs=req.logprobs, prompt_len=max(map(len, prompts)))
        job = _Job(self, prompts, params, req, http_request)
        job.prompt_texts = texts
        return job

    async def chat_job(self, req: ChatCompletionRequest, http_request) -> "_Job":
        if self.template is None:
            raise APIError(400, self.template_error, param="messages", code="no_chat_template")
        add_generation_prompt = True if req.add_generation_prompt is None else req.add_generation_prompt
        self.check_prompt_bytes([m.text() for m in req.messages], "messages")
        prompt, ids = await asyncio.to_thread(self.chat_ids, req.messages, add_generation_prompt)
        tok = self.tokenizer
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # as OpenAI: the rest of the context
            max_tokens = max(1, self.context - len(ids))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, max_tokens=max_tokens, logprobs=logprobs, prompt_len=len(ids))
        for marker in self.template.end_markers:
            marker_id = special_marker_id(tok, marker)
            if marker_id is not None:  # stop_token_ids end a sequence beside EOS
                params = params.replace(stop_token_ids=sorted(set(params.stop_token_ids or ()) | {marker_id}))
            else:
                params = params.replace(stop=params.stop + (marker,))
        return _Job(self, [ids], params, req, http_request)

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        known = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise APIError(400, f"The request field '{unknown[0]}' is not supported by /tokenize.", param=unknown[0])
        self.check_model(body.get("model"))
        for name in ("add_special_tokens", "add_generation_prompt", "return_token_strs"):
            if name in body and not isinstance(body[name], bool):
                raise APIError(400, f"'{name}' must be a boolean.", param=name)
        if ("prompt" in body) == ("messages" in body):
            raise APIError(400, "Give either 'prompt' (a string) or 'messages' (a chat), not both or neither.",
                           param="prompt")
        if "prompt" in body:
            if not isinstance(body["prompt"], str):
                raise APIError(400, "'prompt' must be a string.", param="prompt")
            self.check_prompt_bytes([body["prompt"]], "prompt")
            add_bos = bool(self.lm.config.extra.get("add_bos", False)) and body.get("add_special_tokens", True)
            ids = await asyncio.to_thread(self.tokenizer.encode, body["prompt"], add_bos=add_bos)
        else:
            if self.template is None:
                raise APIError(400, self.template_error, param="messages", code="no_chat_template")
            req = self.validate(ChatCompletionRequest, {"messages": body["messages"]})
            self.check_prompt_bytes([m.text() for m in req.messages], "messages")
            _, ids = await asyncio.to_thread(self.chat_ids, req.messages, body.get("add_generation_prompt", True))
        strs = [token_text(self.tokenizer, t) for t in ids] if body.get("return_token_strs") else None
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids, "token_strs": strs}

    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(body) - {"model", "tokens"})
        if unknown:
            raise APIError(400, f"The request field '{unknown[0]}' is not supported by /detokenize.",
                           param=unknown[0])
        self.check_model(body.get("model"))
        ids = body.get("tokens")
        vocab = self.lm.config.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError(400, "'tokens' must be a list of token ids.", param="tokens")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is outside the model's vocabulary of {vocab}.", param="tokens")
        return {"prompt": await asyncio.to_thread(self.tokenizer.decode, ids)}

    def check_prompt_bytes(self, texts: list[str], param: str) -> None:
        """Refuse, before tokenizing, texts too long to fit the context whatever their tokens: no token holds
        more than the vocabulary's longest token (in UTF-8 bytes; a lone surrogate counts as its 3 bytes)."""
        nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if nbytes > self.max_prompt_bytes:
            raise APIError(400, f"The {param} holds {nbytes:,} bytes, more than the model's context of "
                                f"{self.context} tokens can hold; shorten it.", param=param,
                           code="context_length_exceeded")

    def chat_ids(self, messages, add_generation_prompt: bool = True) -> tuple[str, list[int]]:
        prompt = self.chat_prompt(messages, add_generation_prompt=add_generation_prompt)
        tok = self.tokenizer
        add_bos = bool(self.lm.config.extra.get("add_bos", False))
        if tok.bos_token and prompt.startswith(tok.bos_token):
            add_bos = False  # the template writes BOS itself
        return prompt, tok.encode(prompt, add_bos=add_bos) or self._start_ids()

    def chat_prompt(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt the chat template renders for request messages (developer is OpenAI's new name for
        system, and is given to the template as system)."""
        plain = []
        for m in messages:
            role = "system" if m.role == "developer" else m.role
            plain.append({"role": role, "content": m.text(), "name": m.name})
        if add_generation_prompt and plain[-1]["role"] != "user":
            raise APIError(400, "The last message must have the role 'user' (or send add_generation_prompt: "
                                "false to render the conversation as it is).", param="messages")
        try:
            return self.template.apply(plain, add_generation_prompt=add_generation_prompt)
        except GenerationError as exc:
            raise APIError(400, str(exc), param="messages") from None

    def _start_ids(self) -> list[int]:
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise APIError(400, "An empty prompt needs a BOS or EOS token, and this model's tokenizer has neither.",
                           param="prompt")
        return [start]

    def _completion_prompts(self, prompt) -> tuple[list[list[int]], list[str]]:
        tok = self.tokenizer
        vocab = self.lm.config.vocab_size
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "The prompt list is empty; give at least one prompt.", param="prompt")
        add_bos = bool(self.lm.config.extra.get("add_bos", False))
        ids, texts = [], []
        for p in prompt:
            if isinstance(p, str):
                ids.append(tok.encode(p, add_bos=add_bos) or self._start_ids())
                texts.append(p)
            else:
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise APIError(400, f"Prompt token id {bad[0]} is outside the model's vocabulary of {vocab}.",
                                   param="prompt")
                ids.append(list(p) or self._start_ids())
                texts.append(tok.decode([t for t in p if t < tok.vocab_size]))
        return ids, texts

    def _params(self, req, *, max_tokens, logprobs, prompt_len: int):
        """The request's GenerationConfig, over the model directory's defaults (GenerationConfig.from_openai:
        one sentence and a 400 for a bad value, the same the API and the CLI give)."""
        from ..generation.config import GenerationConfig

        if req.use_beam_search:
            raise APIError(400, "Beam search is not available in the batching server; use gptgen generate "
                                "--num-beams or LanguageModel.generate(num_beams=...).", param="use_beam_search")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported by the batching server; ask for n choices instead.",
                           param="best_of")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server; use bad_words to ban text.",
                           param="logit_bias")
        for name in ("tools", "functions"):
            if getattr(req, name, None):
                raise APIError(400, f"{name} (function calling) is not supported by this model.", param=name)
        # only the fields the client sent: the others keep the model directory's defaults
        fields = {name: getattr(req, name) for name in _REQUEST_OPTIONS if name in req.model_fields_set}
        fields.update(req.model_extra or {}, max_tokens=max_tokens, logprobs=logprobs)
        try:
            params = GenerationConfig.from_openai(fields, base=self.lm.generation_config)
        except GenerationError as exc:
            word = str(exc).split(" ", 1)[0]
            param = next((k for k in fields if word in (k, _OPENAI_NAMES.get(k)) or f"'{k}'" in str(exc)), None)
            raise APIError(400, str(exc), param=param, code="invalid_value") from None
        if prompt_len + params.max_new_tokens > self.context:
            tokens = f"{prompt_len} token{'' if prompt_len == 1 else 's'}"
            raise APIError(400, f"The prompt has {tokens} and max_tokens is {max_tokens}, more than the "
                                f"model's context of {self.context} tokens; shorten the prompt or lower max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return params


# Request fields that are decoding options (GenerationConfig.from_openai maps their names).
_REQUEST_OPTIONS = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
                    "response_format")
_OPENAI_NAMES = {"max_tokens": "max_new_tokens", "n": "num_return_sequences", "min_tokens": "min_new_tokens"}


class _Job:
    """One API request in the engine: its submissions, the queue of their events, and the response."""

    def __init__(self, server: _ServerState, prompts: list[list[int]], params, req, http_request) -> None:
        from ..generation.batcher import PromptTooLong, QueueFull

        self.server = server
        self.engine = server.engine
        self.prompts = prompts
        self.params = params
        self.req = req
        self.n = params.num_return_sequences
        self.prompt_texts: list[str] = []
        self.arrival = time.perf_counter()
        self.created = int(time.time())
        # Events cross from the engine thread in a deque; the loop is woken once per batch of events
        # (one decode step of many rows costs one wake-up, not one per token).
        self.pending: collections.deque = collections.deque()
        self.wake = asyncio.Event()
        self.signalled = False
        self.gone = False
        self.requests = []
        self.finished = False
        self.failed = False  # the engine ended a choice with finish_reason "error"
        loop = asyncio.get_running_loop()
        from .hardening import admit

        admit(self.engine, len(prompts))  # 400 if they can never fit, 429 if not now: before any is queued
        for p_i, ids in enumerate(prompts):
            def on_event(event, p_i=p_i):  # engine thread: hand over, never block
                self.pending.append((p_i, event))
                if not self.signalled:  # checked after the append: the consumer clears it before draining
                    self.signalled = True
                    try:
                        loop.call_soon_threadsafe(self.wake.set)
                    except RuntimeError:  # the loop has closed (server shutting down)
                        pass
            try:
                self.requests.append(self.engine.submit(ids, params, on_event))
            except QueueFull as exc:
                self.cancel()
                raise APIError(429, str(exc) or "The server is busy; retry later.", code="queue_full",
                               headers={"Retry-After": "1"}) from None
            except PromptTooLong as exc:
                self.cancel()
                raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
            except GptgenError as exc:
                self.cancel()
                param = "response_format" if "response_format" in str(exc) else None
                raise APIError(400, str(exc), param=param, code="invalid_value") from None
        # Watch the connection from now on, with a callback rather than a check in the event loop below:
        # a response that is never started, or a stream the server stops reading after a failed send,
        # must still free its slots.
        self.watcher = asyncio.ensure_future(_wait_disconnect(http_request))
        self.watcher.add_done_callback(lambda t: None if t.cancelled() else self._client_gone())
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens: dict[int, int] = {}
        self.first_token: float | None = None
        self.last_token: dict[int, float] = {}

    def cancel(self) -> None:
        if self.finished:
            return
        for request in self.requests:
            self.engine.cancel(request)

    # Events ---------------------------------------------------------------------------------------
    async def events(self, request) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, TokenEvent) until every choice has finished; cancels on disconnect."""
        remaining = len(self.prompts) * self.n
        metrics = self.server.metrics
        metrics.running += 1
        try:
            while remaining:
                if not self.pending:
                    await self.wake.wait()
                    self.wake.clear()
                    self.signalled = False
                if self.gone:
                    return
                if not self.pending:
                    continue
                p_i, event = self.pending.popleft()
                choice = p_i * self.n + event.index
                now = time.perf_counter()
                if event.token_id is not None:
                    if self.first_token is None:
                        self.first_token = now
                        metrics.ttft.observe(now - self.arrival)
                    elif choice in self.last_token:
                        metrics.tpot.observe(now - self.last_token[choice])
                    self.last_token[choice] = now
                if event.finish_reason is not None:
                    remaining -= 1
                    self.completion_tokens[choice] = event.completion_tokens
                    if event.finish_reason == "error":
                        self.failed = True
                yield choice, event
            self.finished = True
            metrics.e2e.observe(time.perf_counter() - self.arrival)
        finally:
            self.watcher.cancel()
            if not self.finished:
                self.cancel()
            metrics.running -= 1
            for req in self.requests:  # the engine's own clock (monotonic) for its stages; cancelled ones too
                admitted, prefilled = req.admitted_at, req.prefilled_at
                if admitted is not None:
                    metrics.queue.observe(max(0.0, admitted - req.submitted_at))
                    if prefilled is not None:
                        metrics.prefill.observe(max(0.0, prefilled - admitted))
            metrics.prompt_tokens += self.prompt_tokens
            metrics.generation_tokens += sum(self.completion_tokens.values())

    def _client_gone(self) -> None:
        self.gone = True
        self.wake.set()
        if not self.finished:
            self.server.metrics.cancelled += 1
            self.cancel()

    def _raise_if_failed(self) -> None:
        if self.failed:
            raise APIError(500, "The engine failed while generating this answer; see the server log.")

    def _failure_event(self) -> str:
        return _event(error_body(500, "The engine failed while generating this answer; see the server log."))

    def usage(self) -> dict[str, int]:
        completion = sum(self.completion_tokens.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _choices(self) -> int:
        return len(self.prompts) * self.n

    # Token text for logprobs -------------------------------------------------------------------------
    def _token_text(self, token_id: int) -> str:
        return token_text(self.server.tokenizer, token_id)

    # /v1/completions ---------------------------------------------------------------------------------
    def _completion_logprobs(self, tokens, offset: int) -> dict[str, Any]:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, logprob, top, *piece in tokens:
            # the text this token added to the answer (so tokens join back into the text), else its own text
            text = piece[0] if piece else self._token_text(token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(None if top is None else {t_text: lp for _, t_text, lp in top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    async def _echo_logprobs(self, p_i: int) -> list[tuple[int, float | None, list | None]]:
        """The prompt's tokens with their log-probabilities (the first has none), for echo with logprobs."""
        ids = self.prompts[p_i]
        top = self.params.logprobs or 0
        return await asyncio.to_thread(_prompt_logprobs, self.server.lm, self.server.tokenizer, ids, top)

    async def collect_completion(self, request) -> dict[str, Any]:
        texts = [""] * self._choices()
        finish = [None] * self._choices()
        tokens: list[list] = [[] for _ in range(self._choices())]
        want_logprobs = self.params.logprobs is not None
        async with aclosing(self.events(request)) as events:
            async for choice, event in events:
                texts[choice] += event.text
                if want_logprobs:
                    _add_token(tokens[choice], event)
                if event.finish_reason is not None:
                    finish[choice] = event.finish_reason
        if not self.finished:
            return None  # the client is gone; nobody reads an answer
        self._raise_if_failed()
        choices = []
        for c in range(self._choices()):
            p_i = c // self.n
            text = texts[c]
            logprobs = None
            if self.req.echo:
                text = self.prompt_texts[p_i] + text
            if want_logprobs:
                toks = (await self._echo_logprobs(p_i) if self.req.echo else []) + tokens[c]
                logprobs = self._completion_logprobs(toks, 0)
            choices.append({"index": c, "text": text, "logprobs": logprobs, "finish_reason": finish[c]})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": self.created,
                "model": self.server.model_name, "choices": choices, "usage": self.usage()}

    async def stream_completion(self, request) -> AsyncIterator[str]:
        rid = f"cmpl-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "text_completion", "created": self.created, "model": self.server.model_name}
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        want_logprobs = self.params.logprobs is not None
        offsets = [0] * self._choices()

        def chunk(choice: int, text: str, toks, finish) -> str:
            logprobs = None
            if want_logprobs:
                logprobs = self._completion_logprobs(toks, offsets[choice])
                offsets[choice] += len(text)
            body = dict(base, choices=[{"index": choice, "text": text, "logprobs": logprobs, "finish_reason": finish}])
            if include_usage:
                body["usage"] = None
            return _event(body)

        if self.req.echo:
            for c in range(self._choices()):
                p_i = c // self.n
                toks = await self._echo_logprobs(p_i) if want_logprobs else []
                yield chunk(c, self.prompt_texts[p_i], toks, None)
        pending: dict[int, list] = {}
        async with aclosing(self.events(request)) as events:
            async for choice, event in events:
                toks = _stream_tokens(pending.setdefault(choice, []), event, event.text, want_logprobs)
                if event.finish_reason == "error":
                    yield self._failure_event()
                    return
                if event.text or toks or event.finish_reason is not None:
                    yield chunk(choice, event.text, toks, event.finish_reason)
        if not self.finished:
            return
        if include_usage:
            yield _event(dict(base, choices=[], usage=self.usage()))
        yield "data: [DONE]\n\n"

    # /v1/chat/completions ---------------------------------------------------------------------------
    def _chat_logprobs(self, tokens) -> dict[str, Any]:
        content = []
        for token_id, logprob, top, *piece in tokens:
            text = piece[0] if piece else self._token_text(token_id)
            alternatives = [{"token": t_text, "logprob": lp, "bytes": list(t_text.encode("utf-8"))}
                            for _, t_text, lp in (top or [])]
            content.append({"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
                            "top_logprobs": alternatives})
        return {"content": content, "refusal": None}

    async def collect_chat(self, request) -> dict[str, Any]:
        texts = [""] * self.n
        finish = [None] * self.n
        tokens: list[list] = [[] for _ in range(self.n)]
        async with aclosing(self.events(request)) as events:
            async for choice, event in events:
                if self.req.logprobs:
                    _add_token(tokens[choice], event, strip=not texts[choice].strip())
                texts[choice] += event.text
                if event.finish_reason is not None:
                    finish[choice] = event.finish_reason
        if not self.finished:
            return None
        self._raise_if_failed()
        choices = [{"index": c, "message": {"role": "assistant", "content": texts[c].lstrip(), "refusal": None},
                    "logprobs": self._chat_logprobs(tokens[c]) if self.req.logprobs else None,
                    "finish_reason": finish[c]} for c in range(self.n)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": self.created,
                "model": self.server.model_name, "choices": choices, "usage": self.usage()}

    async def stream_chat(self, request) -> AsyncIterator[str]:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "chat.completion.chunk", "created": self.created,
                "model": self.server.model_name}
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)

        def chunk(choice: int, delta: dict, toks, finish) -> str:
            logprobs = self._chat_logprobs(toks) if (self.req.logprobs and toks) else None
            body = dict(base, choices=[{"index": choice, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish}])
            if include_usage:
                body["usage"] = None
            return _event(body)

        for c in range(self.n):
            yield chunk(c, {"role": "assistant", "content": ""}, [], None)
        # Answers lose their leading white space (the template's turn prefix is often followed by a space).
        started = [False] * self.n
        pending: dict[int, list] = {}
        async with aclosing(self.events(request)) as events:
            async for choice, event in events:
                if event.finish_reason == "error":
                    yield self._failure_event()
                    return
                text = event.text
                if not started[choice]:
                    text = text.lstrip()
                    started[choice] = bool(text)
                toks = _stream_tokens(pending.setdefault(choice, []), event, text, self.req.logprobs)
                if text or toks:
                    yield chunk(choice, {"content": text}, toks, None)
                if event.finish_reason is not None:
                    yield chunk(choice, {}, [], event.finish_reason)
        if not self.finished:
            return
        if include_usage:
            yield _event(dict(base, choices=[], usage=self.usage()))
        yield "data: [DONE]\n\n"


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _wait_disconnect(request) -> None:
    """Return when the client has gone away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _prompt_logprobs(lm, tokenizer, ids: list[int], top: int):
    """(token, logprob, top alternatives) for each prompt token; the first token has no logprob."""
    import torch

    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids], device=lm.device))
        if isinstance(logits, tuple):
            logits = logits[0]
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    pieces = _pieces(tokenizer, ids)
    out = [(ids[0], None, None, pieces[0])]
    for i in range(1, len(ids)):
        row = logprobs[i - 1]
        alternatives = None
        if top:
            values, index = row.topk(top)
            alternatives = [(int(t), token_text(tokenizer, int(t)), float(v)) for v, t in zip(values, index)]
        out.append((ids[i], float(row[ids[i]]), alternatives, pieces[i]))
    return out


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded prompt (WordPiece's "##" and spaces as decoding makes them);
    a token inside a multi-byte character adds nothing until the character is whole."""
    out, before = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1])
        if text.endswith("\ufffd"):
            out.append("")
            continue
        out.append(text[len(before):] if text.startswith(before) else token_text(tokenizer, ids[i]))
        before = text
    return out


def _stream_tokens(pending: list, event, text: str, want: bool) -> list:
    """The tokens a stream chunk carrying `text` reports, so a chunk's tokens join into its text: a token whose
    text has not come yet (part of a character, text held back for a stop string, the last token's text that
    comes with the finish) waits for the chunk that brings it, and that text goes to the latest token."""
    if want and event.token_id is not None and event.logprob is not None:
        pending.append([event.token_id, event.logprob, event.top_logprobs, ""])
    if not pending or not (text or event.finish_reason is not None):
        return []
    pending[-1][3] = text
    out = [tuple(t) for t in pending]
    pending.clear()
    return out


def _add_token(tokens: list, event, strip: bool = False) -> None:
    """Record a token event for logprobs with the text it added to the answer; text that arrives without a
    token (held back for a stop string, released at the end) joins the last token's."""
    text = event.text.lstrip() if strip else event.text
    if event.token_id is not None and event.logprob is not None:
        tokens.append((event.token_id, event.logprob, event.top_logprobs, text))
    elif text and tokens:
        token_id, logprob, top, last = tokens[-1]
        tokens[-1] = (token_id, logprob, top, last + text)
