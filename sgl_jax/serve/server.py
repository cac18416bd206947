"""The HTTP server: SGLang's native API and the OpenAI-compatible API over one `Engine`.

A request's life:
1. `_Gate` (plain ASGI middleware) answers 503 while the server drains, 401 without the API key
   (every route but /health), and 413 for a body over `server.max_body_bytes`; it reads the body once.
2. The route parses the JSON (`protocol.py`) into `SubRequest`s, one engine sequence each (batch
   items x n samples), naming any bad field in a 400.
3. Every sub-request is prepared by `engine.prepare` (validated and tokenized once, in a worker thread)
   before any byte of the answer is sent, so a stream never starts on a request the engine would refuse.
4. `ServerState.stream_one` runs one `engine.generate_stream`, keeping its rid in `inflight` (for
   /abort_request and for draining). It always ends with an event whose `finish_reason` is set,
   and on any early exit it closes the engine's generator and aborts the rid, so the engine frees
   the request's KV pages.
5. Non-streaming routes keep each sub-request's last event, racing a watcher of the client's
   connection: a client that goes away cancels the generation. Streaming routes send SSE events
   (`data: {json}\\n\\n`, then `data: [DONE]\\n\\n`) through `_SSEResponse`, which also watches the
   connection and closes the event generator when the client disconnects.
6. SIGINT/SIGTERM (`_Server.handle_exit`): stop accepting connections, let in-flight requests run up
   to `server.drain_timeout_s`, abort the rest (each gets its final abort event as the reply), stop
   uvicorn, then `engine.shutdown()`. A second signal aborts at once; a third exits without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sgl_jax import __version__
from sgl_jax.config import Config, ServerConfig
from sgl_jax.errors import EngineDeadError, InvalidRequestError
from sgl_jax.serve import protocol
from sgl_jax.serve.protocol import SubRequest

log = logging.getLogger("sgl_jax.serve")

_DONE = b"data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------
# JSON and SSE
# ---------------------------------------------------------------------------------------------------

def _finite(x: Any) -> Any:
    """Replace non-finite floats (invalid JSON) recursively: -inf -> -9999.0 (OpenAI's floor), else null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else (-9999.0 if x == -math.inf else None)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def dumps(obj: Any) -> bytes:
    try:
        s = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        s = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"))
    return s.encode("utf-8")


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def error_response(status: int, message: str) -> Response:
    return json_response({"error": {"message": message, "code": status}}, status)


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def sse_error(e: Exception) -> bytes:
    """The SSE event that ends a stream which failed mid-way (call inside the `except`: it logs the trace)."""
    if isinstance(e, InvalidRequestError):
        return sse({"error": {"message": str(e), "code": 400}})
    if isinstance(e, EngineDeadError):
        return sse({"error": {"message": str(e), "code": 503}})
    log.exception("engine error while streaming")
    return sse({"error": {"message": f"internal error: {type(e).__name__}: {e}", "code": 500}})


class _SSEResponse(Response):
    """Server-sent events from an async generator of bytes.

    Unlike Starlette's StreamingResponse it notices a disconnect while the generator is waiting for
    the engine (not only at the next write), and it always closes the generator, so the engine's
    requests behind it are aborted at once.
    """

    media_type = "text/event-stream"

    def __init__(self, gen: AsyncIterator[bytes]):
        # Like StreamingResponse: no `body`, so no content-length header.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    async def __call__(self, scope, receive, send) -> None:
        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass

        async def pump():
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.gen:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if not pump_task.done():
                log.info("client disconnected mid-stream; aborting its requests")
                pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump_task
        finally:
            watch_task.cancel()
            pump_task.cancel()
            with contextlib.suppress(BaseException):
                await self.gen.aclose()


# ---------------------------------------------------------------------------------------------------
# Server state: in-flight requests, aborts, drain
# ---------------------------------------------------------------------------------------------------

class ServerState:
    def __init__(self, engine, config: ServerConfig, metrics=None):
        self.engine = engine
        self.config = config
        self.metrics = metrics if metrics is not None else getattr(engine, "metrics", None)
        self.draining = False
        self.started_at = time.time()
        self.inflight: dict[str, SubRequest] = {}
        self.groups: dict[str, list[str]] = {}   # a client's rid / OpenAI id -> engine rids
        self.shutdown_message = "the server is shutting down"

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.engine.model_path

    async def prepare(self, subs: list[SubRequest]) -> None:
        """Validate and tokenize every sub-request once, in a worker thread (never on the event loop);
        raises InvalidRequestError before anything is queued. n samples of one prompt prepare once.
        A dead engine raises EngineDeadError (503) here, before a stream's 200 is sent."""
        ok, why = self.engine.health()
        if not ok:
            raise EngineDeadError(why)
        for s in subs:
            if s.rid in self.inflight:
                raise InvalidRequestError(f"rid {s.rid!r} is already in use by a running request", field="rid")

        def work():
            done: dict[str, Any] = {}
            for s in subs:
                kw = dict(s.stream_kwargs(), rid=None)
                key = repr(kw)
                if key not in done:
                    done[key] = self.engine.prepare(**kw)
                s.prepared = done[key].with_rid(s.rid)

        await asyncio.to_thread(work)

    @contextlib.contextmanager
    def group(self, rid: str | None, subs: list[SubRequest]):
        if rid is not None:
            self.groups[rid] = [s.rid for s in subs]
        try:
            yield
        finally:
            if rid is not None:
                self.groups.pop(rid, None)

    def abort(self, rid: str) -> bool:
        found = False
        for r in self.groups.get(rid, [rid]):
            found |= bool(self.engine.abort(r))
        return found

    def abort_all(self) -> int:
        return sum(bool(self.engine.abort(r)) for r in list(self.inflight))

    async def stream_one(self, sub: SubRequest, stream: bool = True) -> AsyncIterator[dict]:
        """The engine's events for one sub-request; the last one always has a finish_reason."""
        if sub.rid in self.inflight:
            raise InvalidRequestError(f"rid {sub.rid!r} is already in use by a running request", field="rid")
        if sub.prepared is None:
            raise RuntimeError(f"sub-request {sub.rid!r} was not prepared")
        self.inflight[sub.rid] = sub
        agen = self.engine.generate_stream(prepared=sub.prepared, stream=stream)
        last: dict | None = None
        finished = False
        try:
            async for ev in agen:
                last = ev
                finished = (ev.get("meta_info") or {}).get("finish_reason") is not None
                yield ev
            if not finished:  # the engine ended without a final event (e.g. aborted): say so
                finished = True
                last = last or {"text": "", "output_ids": [], "meta_info": {"id": sub.rid}}
                yield {**last, "meta_info": {**last.get("meta_info", {}), "finish_reason": {
                    "type": "abort", "message": self.shutdown_message if self.draining else "aborted"}}}
        finally:
            self.inflight.pop(sub.rid, None)
            # Closing the generator is the interface's abort (a no-op once it is exhausted); the
            # explicit abort covers an engine whose generator was interrupted by a cancellation.
            with contextlib.suppress(BaseException):
                await agen.aclose()
            if not finished:
                self.engine.abort(sub.rid)

    async def merged(self, subs: list[SubRequest], stream: bool = True) -> AsyncIterator[tuple[SubRequest, dict]]:
        """Events of several sub-requests as they come, tagged with their sub-request."""
        if len(subs) == 1:
            async with contextlib.aclosing(self.stream_one(subs[0], stream)) as s:
                async for ev in s:
                    yield subs[0], ev
            return
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump(sub):
            try:
                async with contextlib.aclosing(self.stream_one(sub, stream)) as s:
                    async for ev in s:
                        queue.put_nowait((sub, ev))
            except Exception as e:  # handed to the consumer, which raises it
                queue.put_nowait((sub, e))
            finally:
                queue.put_nowait((sub, end))

        tasks = [asyncio.ensure_future(pump(s)) for s in subs]
        try:
            left = len(tasks)
            while left:
                sub, ev = await queue.get()
                if ev is end:
                    left -= 1
                elif isinstance(ev, Exception):
                    raise ev
                else:
                    yield sub, ev
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, subs: list[SubRequest], request: Request | None) -> list[dict] | None:
        """Each sub-request's last event, in order; None if the client disconnected first."""
        finals: list[dict | None] = [None] * len(subs)

        async def run():
            async with contextlib.aclosing(self.merged(subs, stream=False)) as m:
                async for sub, ev in m:
                    finals[sub.index - subs[0].index] = ev

        if request is None:
            await run()
            return finals  # type: ignore[return-value]
        work = asyncio.ensure_future(run())
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                log.info("client disconnected; aborted %d request(s)", len(subs))
                return None
        work.result()  # re-raise an engine error
        return finals  # type: ignore[return-value]

    async def drain(self, timeout: float, hurry: asyncio.Event | None = None, grace: float = 10.0) -> None:
        """Refuse new work; give in-flight requests `timeout` seconds; then abort what is left."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.inflight:
            log.info("draining: %d request(s) in flight, waiting up to %.1f s", len(self.inflight), timeout)
        while self.inflight and loop.time() < deadline and not (hurry and hurry.is_set()):
            await asyncio.sleep(0.05)
        if self.inflight:
            log.warning("drain: aborting %d request(s) still running", len(self.inflight))
            self.abort_all()
            deadline = loop.time() + grace
            while self.inflight and loop.time() < deadline:
                await asyncio.sleep(0.05)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------------------------
# The gate: drain, auth, body size
# ---------------------------------------------------------------------------------------------------

class _Gate:
    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg = self.state.config
        path = scope.get("path", "")
        if self.state.draining:
            return await error_response(503, self.state.shutdown_message)(scope, receive, send)
        if cfg.api_key and path != "/health":
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
                return await error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")(
                    scope, receive, send)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            limit = cfg.max_body_bytes
            headers = dict(scope.get("headers") or [])
            try:
                declared = int(headers.get(b"content-length", b"-1"))
            except ValueError:
                declared = -1
            if declared > limit:
                return await error_response(
                    413, f"request body is {declared} bytes; the limit server.max_body_bytes is {limit}")(
                    scope, receive, send)
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunks.append(msg.get("body", b""))
                size += len(chunks[-1])
                if size > limit:
                    return await error_response(
                        413, f"request body exceeds the limit server.max_body_bytes={limit}")(scope, receive, send)
                if not msg.get("more_body"):
                    break
            body = b"".join(chunks)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------

async def _json(request: Request, required: bool = True) -> Any:
    raw = await request.body()
    if not raw.strip():
        if required:
            raise InvalidRequestError("the request body is empty; expected a JSON object", field="body")
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"the request body is not valid JSON: {e}", field="body") from None


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(body).__name__}", field="body")
    return body


def create_app(engine, server_config: ServerConfig | None = None, metrics=None) -> FastAPI:
    """The ASGI app over `engine` (see module docstring). `metrics` is what /metrics renders;
    by default the engine's `metrics` attribute, if any.

    Long because the routes are closures over one app's state (engine, tokenizer, config); each route is
    short.
    """
    cfg = server_config or ServerConfig()
    state = ServerState(engine, cfg, metrics)
    app = FastAPI(title="sgl_jax", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sgl = state
    app.add_middleware(_Gate, state=state)
    tok = engine.tokenizer

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request, exc: InvalidRequestError):
        return error_response(400, str(exc))

    @app.exception_handler(EngineDeadError)
    async def _dead(request, exc: EngineDeadError):
        return error_response(503, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request, exc):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    # -- SGLang native -----------------------------------------------------------------------------

    @app.post("/generate")
    async def generate(request: Request):
        body = await _json(request)
        req = await asyncio.to_thread(protocol.parse_generate, body, vocab_size=int(tok.vocab_size),
                                      max_context=int(engine.max_context_len))
        await state.prepare(req.subs)
        if req.stream:
            async def events():
                with state.group(req.rid, req.subs):
                    try:
                        async with contextlib.aclosing(state.merged(req.subs)) as m:
                            async for sub, ev in m:
                                yield sse({**ev, "index": sub.index} if req.batched else ev)
                    except Exception as e:
                        yield sse_error(e)
                yield _DONE
            return _SSEResponse(events())
        with state.group(req.rid, req.subs):
            finals = await state.collect(req.subs, request)
        if finals is None:
            return Response(status_code=499)
        return json_response(finals if req.batched else finals[0])

    @app.get("/get_model_info")
    async def get_model_info():
        return json_response({
            "model_path": engine.model_path, "tokenizer_path": engine.model_path, "is_generation": True,
            "served_model_name": state.model_name, "max_context_len": engine.max_context_len,
            "vocab_size": int(tok.vocab_size), "weight_version": "default", "preferred_sampling_params": None,
            # the model's own chat template, so clients (our frontend) use its real role markup
            "chat_template": getattr(tok, "chat_template", None), "bos_token": getattr(tok, "bos_token", None),
            "eos_token": getattr(tok, "eos_token", None),
        })

    async def server_info():
        info = dict(await asyncio.to_thread(engine.get_server_info))
        srv = dataclasses.asdict(cfg)
        srv["api_key"] = "***" if srv.get("api_key") else ""
        info.setdefault("model_path", engine.model_path)
        info.setdefault("max_context_len", engine.max_context_len)
        info["server"] = srv
        info["version"] = __version__
        info["num_inflight_requests"] = len(state.inflight)
        info["uptime_s"] = round(time.time() - state.started_at, 3)
        return json_response(info)

    app.add_api_route("/server_info", server_info, methods=["GET"])
    app.add_api_route("/get_server_info", server_info, methods=["GET"])

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        # The engine runs the flush on its own thread between steps: wait off the event loop.
        if await asyncio.to_thread(engine.flush_cache):
            return json_response({"success": True, "message": "cache flushed"})
        return error_response(400, "cache not flushed: requests are running or waiting; retry when idle")

    @app.get("/health")
    async def health():
        ok, why = engine.health()
        if not ok:
            return error_response(503, why)
        return json_response({"status": "ok"})

    @app.get("/health_generate")
    async def health_generate():
        ids = tok.encode("Hi", add_special_tokens=True) or [int(getattr(tok, "eos_token_id", 0) or 0)]
        sub = SubRequest(index=0, rid=protocol.new_id("health-"), input_ids=list(ids),
                         sampling_params={"max_new_tokens": 1, "temperature": 0, "ignore_eos": True})
        try:
            await state.prepare([sub])
            finals = await asyncio.wait_for(state.collect([sub], None), timeout=cfg.health_generate_timeout_s)
        except asyncio.TimeoutError:
            return error_response(503, f"no token within server.health_generate_timeout_s="
                                       f"{cfg.health_generate_timeout_s} s")
        except Exception as e:
            return error_response(503, f"generation failed: {type(e).__name__}: {e}")
        fr = finals[0]["meta_info"].get("finish_reason") or {}
        if fr.get("type") == "abort":
            return error_response(503, f"generation aborted: {fr.get('message')}")
        return json_response({"status": "ok", "output_ids": finals[0].get("output_ids", [])})

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = _object(await _json(request))
        if body.get("abort_all") is True:
            return json_response({"success": True, "aborted": state.abort_all()})
        rid = body.get("rid")
        if not isinstance(rid, str) or not rid:
            raise InvalidRequestError(f"rid must be a non-empty string (or send abort_all: true), got {rid!r}",
                                      field="rid")
        return json_response({"success": state.abort(rid)})

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = _object(await _json(request))
        text = body.get("text")
        add = body.get("add_special_tokens", True)
        if not isinstance(add, bool):
            raise InvalidRequestError(f"add_special_tokens must be true or false, got {add!r}",
                                      field="add_special_tokens")
        if isinstance(text, str):  # tokenizing runs in a worker thread, never on the event loop
            ids = await asyncio.to_thread(tok.encode, text, add_special_tokens=add)
            return json_response({"tokens": ids, "count": len(ids), "max_model_len": engine.max_context_len})
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            ids = await asyncio.to_thread(lambda: [tok.encode(t, add_special_tokens=add) for t in text])
            return json_response({"tokens": ids, "count": [len(x) for x in ids],
                                  "max_model_len": engine.max_context_len})
        raise InvalidRequestError(f"text must be a string or a list of strings, got {text!r}"[:200], field="text")

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = _object(await _json(request))
        skip = body.get("skip_special_tokens", True)
        if not isinstance(skip, bool):
            raise InvalidRequestError(f"skip_special_tokens must be true or false, got {skip!r}",
                                      field="skip_special_tokens")
        tokens = body.get("tokens")
        if tokens is None:
            raise InvalidRequestError("tokens is required (a list of token ids)", field="tokens")
        if isinstance(tokens, list) and tokens and all(isinstance(t, list) for t in tokens):
            ids = [protocol._check_ids(t, f"tokens[{i}]", int(tok.vocab_size)) for i, t in enumerate(tokens)]
            return json_response({"text": [tok.decode(x, skip_special_tokens=skip) for x in ids]})
        if tokens == []:
            return json_response({"text": ""})
        ids = protocol._check_ids(tokens, "tokens", int(tok.vocab_size))
        return json_response({"text": tok.decode(ids, skip_special_tokens=skip)})

    @app.post("/concate_and_append_request")
    async def concate_and_append_request():
        # The SGLang frontend calls this after fork(...).join("concate_and_append"); the prefix cache
        # already shares the forks' common prefix, so there is nothing to do (upstream dropped it too).
        return json_response({"success": True})

    @app.get("/metrics")
    async def metrics_route():
        if state.metrics is None:
            return Response(b"", media_type="text/plain; version=0.0.4; charset=utf-8")
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    # -- OpenAI-compatible ---------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models():
        return json_response({"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(state.started_at), "owned_by": "sgl_jax",
            "root": engine.model_path, "max_model_len": engine.max_context_len}]})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json(request)
        req = await asyncio.to_thread(protocol.parse_completion, body, tok, max_context=int(engine.max_context_len))
        return await _openai(request, req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json(request)
        req = await asyncio.to_thread(protocol.parse_chat, body, tok, max_context=int(engine.max_context_len))
        return await _openai(request, req, chat=True)

    async def _openai(request: Request, req: protocol.OpenAIRequest, chat: bool):
        await state.prepare(req.subs)
        if req.stream:
            return _SSEResponse(_openai_events(req, chat))
        with state.group(req.id, req.subs):
            finals = await state.collect(req.subs, request)
        if finals is None:
            return Response(status_code=499)
        shape = protocol.chat_response if chat else protocol.completion_response
        return json_response(shape(req, finals, tok, state.model_name))

    async def _openai_events(req: protocol.OpenAIRequest, chat: bool):
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra):
            return sse({"id": req.id, "object": obj, "created": created, "model": state.model_name,
                        "choices": choices, **extra})

        sent = {s.index: "" for s in req.subs}
        if chat:
            lps = {s.index: protocol.ChatLogprobs(tok, req.logprobs) for s in req.subs} if req.logprobs is not None else {}
            for s in req.subs:
                yield chunk([{"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
        else:
            lps = {s.index: protocol.CompletionLogprobs(tok, req.logprobs, req.echo_texts is not None)
                   for s in req.subs} if req.logprobs is not None else {}
        finals: dict[int, dict] = {}
        echoed: set[int] = set()
        with state.group(req.id, req.subs):
            try:
                async with contextlib.aclosing(state.merged(req.subs)) as m:
                    async for sub, ev in m:
                        meta = ev["meta_info"]
                        reason, matched = protocol.finish_reason(meta)
                        delta = protocol.text_delta(ev["text"], sent[sub.index])
                        sent[sub.index] = ev["text"]
                        if req.echo_texts is not None and sub.index not in echoed:
                            delta = req.echo_texts[sub.index // req.n] + delta
                            echoed.add(sub.index)
                        lp = lps[sub.index].delta(meta) if sub.index in lps else None
                        has_lp = bool(lp and (lp.get("content") or lp.get("tokens")))
                        if not delta and not has_lp and reason is None:
                            continue
                        if chat:
                            choice = {"index": sub.index, "delta": {"content": delta} if delta else {},
                                      "logprobs": lp if has_lp else None, "finish_reason": reason}
                        else:
                            choice = {"index": sub.index, "text": delta, "logprobs": lp if has_lp else None,
                                      "finish_reason": reason}
                        if reason is not None:
                            choice["matched_stop"] = matched
                            finals[sub.index] = ev
                        yield chunk([choice])
                if req.include_usage:
                    ordered = [finals[s.index] for s in req.subs if s.index in finals]
                    yield chunk([], usage=protocol.usage(ordered, req.n))
            except Exception as e:
                yield sse_error(e)
        yield _DONE

    return app


# ---------------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------------

def _uvicorn_server_class():
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn with a drain before the stop (see the module docstring, step 6)."""

        def __init__(self, config, state: ServerState):
            super().__init__(config)
            self.state = state
            self._signals = 0
            self._loop: asyncio.AbstractEventLoop | None = None
            self._hurry: asyncio.Event | None = None
            self._drain_task: asyncio.Future | None = None

        async def serve(self, sockets=None):
            self._loop = asyncio.get_running_loop()
            self._hurry = asyncio.Event()
            await super().serve(sockets)

        def handle_exit(self, sig, frame):  # runs in the signal handler: only schedule work
            self._signals += 1
            if self._loop is None or self._signals >= 3:
                self.force_exit = True
                self.should_exit = True
                return
            self._loop.call_soon_threadsafe(self._on_signal)

        def _on_signal(self):
            if self._drain_task is None:
                log.info("shutdown requested: draining (a second signal aborts in-flight requests now)")
                self._drain_task = asyncio.ensure_future(self._drain())
            else:
                self._hurry.set()

        async def _drain(self):
            try:
                for srv in getattr(self, "servers", []):
                    srv.close()  # stop accepting connections
                await self.state.drain(self.state.config.drain_timeout_s, self._hurry)
            finally:
                self.should_exit = True

    return _Server


async def serve_async(engine, server_config: ServerConfig, metrics=None) -> None:
    """Serve `engine` until SIGINT/SIGTERM, drain, then `engine.shutdown()`."""
    import uvicorn

    app = create_app(engine, server_config, metrics)
    ucfg = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                          log_level=server_config.log_level, timeout_graceful_shutdown=10,
                          timeout_keep_alive=30)
    server = _uvicorn_server_class()(ucfg, app.state.sgl)
    try:
        await server.serve()
    finally:
        log.info("stopping the engine")
        engine.shutdown()


def serve(engine, server_config: ServerConfig, metrics=None) -> None:
    asyncio.run(serve_async(engine, server_config, metrics))


def run(config: Config) -> None:
    """Build the engine from `config.engine` and serve it as `config.server` says."""
    logging.basicConfig(level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main():
        from sgl_jax.engine import Engine
        from sgl_jax.metrics import Metrics

        metrics = Metrics()
        t0 = time.perf_counter()
        engine = Engine(config.engine, metrics=metrics)
        e = config.engine
        print(f"sgl_jax {__version__}: loaded {engine.model_path} in {time.perf_counter() - t0:.1f} s "
              f"(dtype={e.dtype}, page_size={e.cache.page_size}, kv_memory_gb={e.cache.kv_memory_gb}, "
              f"max_context_len={engine.max_context_len}, max_running_requests={e.scheduler.max_running_requests}, "
              f"radix_cache={'off' if e.cache.disable_radix_cache else 'on'})", flush=True)
        print(f"sgl_jax: serving on http://{config.server.host}:{config.server.port}"
              f"{' (API key required)' if config.server.api_key else ''}", flush=True)
        await serve_async(engine, config.server, metrics)

    asyncio.run(main())
