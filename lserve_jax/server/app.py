"""The OpenAI-compatible HTTP API over an `EngineRunner` (FastAPI).

    GET  /v1/models                the served model
    POST /v1/completions           prompt(s) -> text (stream: server-sent events)
    POST /v1/chat/completions      messages -> the assistant's reply (stream: events)
    GET  /health                   200 while the engine runs, 503 otherwise
    GET  /metrics                  Prometheus text

Handlers only translate: they check the body (pydantic, then `SamplingParams`), submit each
prompt to the engine thread and await its outputs. Errors have OpenAI's body
`{"error": {"message", "type", "param", "code"}}`: 400 for a bad request (the field named), 401
for a missing or wrong API key (compared in constant time), 404 for another model's name, 413
for a body over the size limit, 503 when the queue is full or the engine is not running. A
client that disconnects, streaming or not, aborts its requests, which frees their pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from lserve_jax.server.metrics import ServerMetrics
from lserve_jax.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from lserve_jax.server.runner import EngineDead, EngineRunner, QueueFull

log = logging.getLogger("lserve_jax.server")

MAX_BODY_BYTES = 4 * 2**20


def _error(status: int, message: str, *, param: str | None = None,
           type_: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(ApiError(message, status=status, param=param, type_=type_,
                                 code=code).body(), status_code=status)


def _validation_error(e: ValidationError | RequestValidationError) -> ApiError:
    """The 400 of a body that does not fit its schema, naming the first bad field."""
    errors = e.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return ApiError(f"the body is not valid JSON: {first.get('msg', '')}")
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    return ApiError(f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param)


def build_app(runner: EngineRunner, *, model_name: str, api_key: str | None = None,
              metrics: ServerMetrics | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              lifespan=None) -> FastAPI:
    """The API app over a runner (see the module docstring); `lifespan` starts and stops
    it with the server."""
    engine = runner.engine
    metrics = metrics or ServerMetrics(model_name)
    created = int(time.time())
    app = FastAPI(title="lserve_jax", docs_url=None, redoc_url=None, lifespan=lifespan)
    key = api_key.encode() if api_key else None

    app.add_middleware(_Guard, key=key, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc):
        return await on_api_error(request, _validation_error(exc))

    @app.exception_handler(_ClientGone)
    async def on_client_gone(request, exc):
        return Response(status_code=499)  # nobody reads it: the client has left

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def read_body(request: Request, schema):
        """The body parsed into `schema`, read in pieces so a body without a length header
        still stops at the size limit."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(f"the body is over {max_body_bytes} bytes", status=413)
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError("the body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    def check_model(body) -> None:
        if body.model is not None and body.model != model_name:
            raise ApiError(f"the model {body.model!r} does not exist; this server serves "
                           f"{model_name!r}", status=404, param="model",
                           type_="NotFoundError", code="model_not_found")

    @app.get("/health")
    async def health():
        if not runner.alive:
            return _error(503, "the engine is not running", type_="server_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "lserve_jax",
            "root": model_name, "max_model_len": engine.max_model_len}]}

    async def start(prompts: list, sp, prefix: str) -> list:
        """Submit every prompt; returns [(request id, output queue)]. A refused prompt
        aborts the ones already submitted."""
        started = []
        try:
            for prompt in prompts:
                if sp.max_tokens is not None:
                    check_room(prompt, sp.max_tokens)
                rid = runner.new_request_id(prefix)
                started.append((rid, await runner.submit(rid, prompt, sp)))
        except BaseException as e:
            for rid, _ in started:
                runner.abort(rid)
            if isinstance(e, (ValueError, TypeError)):
                message = str(e)  # the engine refused it: the prompt, or its stop ids
                raise ApiError(message, param="stop_token_ids" if message.startswith(
                    "stop_token_ids") else "prompt") from None
            if isinstance(e, (QueueFull, EngineDead)):
                raise ApiError(str(e), status=503, type_="server_error") from None
            raise
        return started

    def check_room(prompt, max_tokens: int) -> None:
        """OpenAI's rule: the prompt plus max_tokens must fit the context."""
        n = len(engine.tokenizer.encode(prompt)) if isinstance(prompt, str) else len(prompt)
        if n + max_tokens > engine.max_model_len:
            raise ApiError(f"this model's context is {engine.max_model_len} tokens; the prompt "
                           f"has {n} and max_tokens asks for {max_tokens} more",
                           param="max_tokens")

    async def collect(started, request: Request) -> list:
        """Await every request's final output; abort them all if the client goes away."""
        async def final(q):
            while True:
                out = await q.get()
                if isinstance(out, Exception):
                    raise ApiError(str(out), status=503, type_="server_error")
                if out.finished:
                    return out

        results = asyncio.gather(*(final(q) for _, q in started))
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([results, watch], return_when=asyncio.FIRST_COMPLETED)
            if not results.done():
                raise _ClientGone
            return results.result()
        except BaseException:
            for rid, _ in started:
                runner.abort(rid)  # a no-op for those that finished
            results.cancel()
            results.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
            raise
        finally:
            watch.cancel()

    # ---- completions ---------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest)
        check_model(body)
        sp = body.to_sampling()
        prompts = body.prompts()
        if any(isinstance(p, str) for p in prompts) and engine.tokenizer is None:
            raise ApiError("this model has no tokenizer: give prompts as token ids",
                           param="prompt")
        started = await start(prompts, sp, "cmpl")
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _sse(_stream_completions(started, body, sp, rid, runner, model_name,
                                            engine), request)
        outs = await collect(started, request)
        choices = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                text = ((out.prompt or _decode(engine, out.prompt_token_ids)) + (c.text or "")
                        if body.echo else c.text or "")
                choices.append({"index": i * sp.n + c.index, "text": text,
                                "logprobs": _completion_logprobs(c.logprobs, c.token_ids,
                                                                 sp.logprobs, engine),
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": _usage(outs)}

    # ---- chat ----------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request, ChatCompletionRequest)
        check_model(body)
        sp = body.to_sampling()
        if engine.tokenizer is None or not engine.tokenizer.chat_template:
            raise ApiError("this model has no chat template; use /v1/completions",
                           param="messages")
        try:
            prompt = engine.render_chat(body.conversation())
        except Exception as e:  # noqa: BLE001 - a template that refuses the conversation
            raise ApiError(f"the chat template refused the messages: {e}",
                           param="messages") from None
        started = await start([prompt], sp, "chatcmpl")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return _sse(_stream_chat(started, body, sp, rid, runner, model_name, engine),
                        request)
        [out] = await collect(started, request)
        choices = [{"index": c.index,
                    "message": {"role": "assistant", "content": c.text or ""},
                    "logprobs": _chat_logprobs(c.logprobs, c.token_ids, sp.logprobs, engine),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                   for c in out.outputs]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": _usage([out])}

    app.state.runner, app.state.metrics = runner, metrics
    return app


class _ClientGone(Exception):
    """The client disconnected before its answer was ready (its requests are aborted)."""


class _Guard:
    """ASGI middleware in front of /v1/: the API key (constant-time comparison) and the
    declared body size. Plain ASGI, so streamed responses pass through untouched."""

    def __init__(self, app, *, key: bytes | None, max_body_bytes: int):
        self.app, self.key, self.max_body_bytes = app, key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope.get("headers", ())}
            refusal = None
            if self.key is not None:
                given = headers.get("authorization", "")
                token = given[7:].encode() if given.lower().startswith("bearer ") else b""
                if not hmac.compare_digest(token, self.key):
                    refusal = _error(401, "missing or wrong API key (Authorization: Bearer ...)",
                                     type_="authentication_error", code="invalid_api_key")
            length = headers.get("content-length")
            if refusal is None and length is not None and (
                    not length.isdigit() or int(length) > self.max_body_bytes):
                refusal = _error(413, f"the body is over {self.max_body_bytes} bytes")
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _usage(outs) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _decode(engine, ids) -> str:
    return engine.tokenizer.decode(ids) if engine.tokenizer is not None else ""


def _token_text(entry, token: int, engine) -> str:
    lp = entry.get(token) if entry else None
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return engine.tokenizer.decode([token], skip_special_tokens=False) if engine.tokenizer else str(token)


def _completion_logprobs(entries, token_ids, k, engine, offset: int = 0) -> dict | None:
    """The legacy completions `logprobs` object (tokens, token_logprobs, top_logprobs,
    text_offset) of generated tokens."""
    if entries is None or k is None:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    position = offset
    for token, entry in zip(token_ids, entries):
        text = _token_text(entry, token, engine)
        tokens.append(text)
        lps.append(entry[token].logprob)
        top = sorted(entry.items(), key=lambda kv: kv[1].rank)[:k] if k else []
        tops.append({_token_text(entry, t, engine): lp.logprob for t, lp in top} if k else None)
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def _chat_logprobs(entries, token_ids, k, engine) -> dict | None:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if entries is None or k is None:
        return None
    content = []
    for token, entry in zip(token_ids, entries):
        text = _token_text(entry, token, engine)
        top = sorted(entry.items(), key=lambda kv: kv[1].rank)[:k]
        content.append({"token": text, "logprob": entry[token].logprob,
                        "bytes": list(text.encode()),
                        "top_logprobs": [{"token": _token_text(entry, t, engine),
                                          "logprob": lp.logprob,
                                          "bytes": list(_token_text(entry, t, engine).encode())}
                                         for t, lp in top]})
    return {"content": content}


def _sse(events: AsyncIterator[dict], request: Request) -> StreamingResponse:
    """Server-sent events of `events`, ending in `data: [DONE]`. The client going away
    is noticed while waiting for the next event too (not only when one is sent), and closes
    `events` (which aborts its requests)."""
    async def body():
        watch = asyncio.ensure_future(_disconnected(request))
        it = aiter(events)
        step = asyncio.get_running_loop().create_future()
        step.set_result(None)
        try:
            while True:
                step = asyncio.ensure_future(anext(it))
                await asyncio.wait([step, watch], return_when=asyncio.FIRST_COMPLETED)
                if not step.done():  # the client left
                    step.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await step
                    return
                try:
                    event = step.result()
                except StopAsyncIteration:
                    break
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watch.cancel()
            if not step.done():  # cancelled while an event was awaited
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
            await it.aclose()
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _outputs(started, runner) -> AsyncIterator[tuple[int, object]]:
    """(prompt index, RequestOutput) as each of the started requests progresses, until all
    finish. Leaving early (the client went away) aborts the unfinished ones."""
    queues = {i: q for i, (_, q) in enumerate(started)}
    pending = {asyncio.ensure_future(q.get()): i for i, q in queues.items()}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                out = task.result()
                if isinstance(out, Exception):
                    raise out
                yield i, out
                if not out.finished:
                    pending[asyncio.ensure_future(queues[i].get())] = i
    finally:
        for task in pending:
            task.cancel()
        for i, (rid, _) in enumerate(started):
            runner.abort(rid)  # a no-op for those that finished


async def _stream_completions(started, body, sp, rid, runner, model_name, engine):
    created = int(time.time())
    ended, finished = set(), {}  # choice indices that sent their finish; prompt index -> output
    sent = {}  # choice index -> characters sent (text offsets of logprobs)
    async for i, out in _outputs(started, runner):
        for c in out.outputs:
            if not c.new_token_ids and not c.new_text and not c.finished:
                continue
            index = i * sp.n + c.index
            if index in ended:
                continue
            text = c.new_text
            if body.echo and index not in sent:
                text = (out.prompt or _decode(engine, out.prompt_token_ids)) + text
            n_new = len(c.new_token_ids)
            logprobs = (_completion_logprobs(c.logprobs[len(c.logprobs) - n_new:],
                                             c.new_token_ids, sp.logprobs, engine,
                                             sent.get(index, 0))
                        if c.logprobs is not None else None)
            sent[index] = sent.get(index, 0) + len(text)
            finish = c.finish_reason
            if finish is not None:
                ended.add(index)
            yield {"id": rid, "object": "text_completion", "created": created,
                   "model": model_name, "choices": [{
                       "index": index, "text": text, "logprobs": logprobs,
                       "finish_reason": finish,
                       "stop_reason": c.stop_reason if finish else None}]}
        if out.finished:
            finished[i] = out
    if body.include_usage:
        yield {"id": rid, "object": "text_completion", "created": created, "model": model_name,
               "choices": [], "usage": _usage(list(finished.values()))}


async def _stream_chat(started, body, sp, rid, runner, model_name, engine):
    created = int(time.time())
    chunk = lambda choices, **extra: {  # noqa: E731
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
        "choices": choices, **extra}
    yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""},
                  "logprobs": None, "finish_reason": None} for j in range(sp.n)])
    final, ended = None, set()
    async for _, out in _outputs(started, runner):
        for c in out.outputs:
            if c.index in ended or (not c.new_token_ids and not c.new_text and not c.finished):
                continue
            if c.finished:
                ended.add(c.index)
            n_new = len(c.new_token_ids)
            logprobs = (_chat_logprobs(c.logprobs[len(c.logprobs) - n_new:], c.new_token_ids,
                                       sp.logprobs, engine) if c.logprobs is not None else None)
            delta = {"content": c.new_text} if c.new_text or not c.finished else {}
            yield chunk([{"index": c.index, "delta": delta, "logprobs": logprobs,
                          "finish_reason": c.finish_reason,
                          "stop_reason": c.stop_reason if c.finished else None}])
        if out.finished:
            final = out
    if body.include_usage and final is not None:
        yield chunk([], usage=_usage([final]))
