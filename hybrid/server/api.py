"""The HTTP routes: /v1/chat/completions, /v1/completions (streamed as server-sent events or not), /v1/models,
/health and /metrics, over one Batcher."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.sampling import SamplingParams
from .batcher import Batcher, Overloaded
from .protocol import ApiError, ChatRequest, CompletionRequest, Sampling
from .sequence import Event, Sequence
from .text import TextStream


def make_app(batcher: Batcher, tokenizer, model_name: str) -> FastAPI:
    app = FastAPI(title="hybrid-moe", version="1")
    app.state.model_name, app.state.tokenizer = model_name, tokenizer
    served = Served(batcher, tokenizer, model_name)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(ApiError(400, f"{param}: {first.get('msg')}" if param else first.get("msg"),
                                     param).body(), status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": batcher.running, "waiting": len(batcher.waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "hybrid-moe"}]}

    @app.get("/metrics")
    async def metrics():
        return Response(batcher.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        prompt = tokenizer.chat([m.plain() for m in body.messages])
        return await respond(served, body, prompt, request, chat=True)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, request: Request):
        return await respond(served, body, tokenizer.encode(body.prompt), request, chat=False)

    return app


@dataclass
class Served:
    batcher: Batcher
    tokenizer: object
    model: str


async def respond(srv: Served, body: Sampling, prompt: list[int], request: Request, chat: bool):
    """Checks the request against the model and its context, queues it, and answers (streamed or whole)."""
    if body.model != srv.model:
        raise ApiError(400, f"model {body.model!r} is not served here: {srv.model!r}", "model", "model_not_found")
    context, param = srv.batcher.engine.context_len, "messages" if chat else "prompt"
    if not prompt:
        raise ApiError(400, "the prompt is empty", param)
    new = body.new_tokens() or context - len(prompt)
    if len(prompt) + new > context:
        raise ApiError(400, f"the prompt's {len(prompt)} tokens + {new} new tokens exceed the context of "
                            f"{context} tokens", param, "context_length_exceeded")
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    seq = Sequence(prompt, SamplingParams(new, body.temperature, body.top_p, body.seed),
                   TextStream(srv.tokenizer, body.stops()),
                   lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), eos=srv.tokenizer.eos_token_id)
    try:
        srv.batcher.submit(seq)
    except Overloaded as e:
        raise ApiError(503, str(e), code="overloaded", kind="server_error") from None
    shape = Shape(body, seq, srv.model, chat)
    if body.stream:
        return StreamingResponse(stream(shape, queue), media_type="text/event-stream")
    return await collect(shape, queue, request)


class Shape:
    """The OpenAI response objects of one request (chat or text completion)."""

    def __init__(self, body: Sampling, seq: Sequence, model: str, chat: bool):
        self.body, self.seq, self.model, self.chat = body, seq, model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def usage(self) -> dict:
        n, m = len(self.seq.prompt), len(self.seq.tokens)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, reason: str) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                   "logprobs": None} if self.chat else
                  {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        return {**self.head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": self.usage()}

    def chunk(self, text: str | None, reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return {**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def usage_chunk(self) -> dict:
        return {**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage()}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(shape: Shape, queue: asyncio.Queue):
    """Server-sent events: a role chunk (chat), text deltas, the finish chunk, usage if asked, [DONE]. A client
    that goes away cancels this generator, and with it the sequence."""
    try:
        if shape.chat:
            yield sse(shape.chunk(None, None, first=True))
        while True:
            ev: Event = await queue.get()
            if ev.error:
                yield sse(ApiError(500, ev.error, kind="server_error").body())
                break
            if ev.delta or ev.finish_reason:
                yield sse(shape.chunk(ev.delta, ev.finish_reason))
            if ev.finish_reason:
                if shape.body.usage_in_stream:
                    yield sse(shape.usage_chunk())
                break
        yield "data: [DONE]\n\n"
    finally:
        shape.seq.cancelled.set()


async def collect(shape: Shape, queue: asyncio.Queue, request: Request) -> JSONResponse:
    """The whole answer at once; a client that disconnects while waiting cancels the sequence."""
    parts = []
    try:
        while True:
            try:
                ev: Event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    shape.seq.cancelled.set()
                    return JSONResponse({}, status_code=499)
                continue
            parts.append(ev.delta)
            if ev.error:
                raise ApiError(500, ev.error, kind="server_error")
            if ev.finish_reason:
                return JSONResponse(shape.whole("".join(parts), ev.finish_reason))
    finally:
        shape.seq.cancelled.set()
