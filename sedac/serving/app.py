"""The HTTP server: OpenAI routes, the original SEDAC routes, health and metrics, all on one AsyncLLM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from sedac import __version__
from sedac.runtime.async_engine import AsyncLLM, QueueFullError
from sedac.runtime.sampling_params import SamplingParams
from sedac.serving.metrics import ServerMetrics
from sedac.serving.openai_api import OpenAIHandlers
from sedac.serving.protocol import (
    BatchGenerateRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    GenerateRequest,
    TokenizeRequest,
)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (`sedac-run serve --max-n/--max-tokens-cap/--max-body-bytes`): vLLM caps
    none but the context; one request here must not take the whole KV pool or the event loop."""

    max_n: int = 64  # choices per request
    max_tokens: int | None = None  # tokens per choice; None: what fits in max_seq_len
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        for name in ("max_n", "max_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def _non_finite(name: str):
    raise ValueError(f"non-finite number {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} overflows a float")
    return value


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


class Server:
    """What the routes share: the engine loop, the tokenizer, validation and metrics."""

    def __init__(self, llm: AsyncLLM, model_name: str, api_key: str | None, limits: RequestLimits):
        self.llm, self.model_name, self.api_key, self.limits = llm, model_name, api_key, limits
        engine = llm.engine
        self.tokenizer, self.max_seq_len = engine.tokenizer, engine.config.build.max_seq_len
        self.max_tokens = min(limits.max_tokens or self.max_seq_len, self.max_seq_len)
        self.metrics = ServerMetrics(model_name)

    async def parse(self, request: Request, schema: type[BaseModel]) -> BaseModel:
        body = await request.body()
        if len(body) > self.limits.max_body_bytes:
            raise HTTPError(413, f"request body is over {self.limits.max_body_bytes} bytes")
        try:
            data = json.loads(body.decode("utf-8"), parse_constant=_non_finite, parse_float=_finite_float)
        except UnicodeDecodeError:
            raise HTTPError(400, "request body is not valid UTF-8") from None
        except (json.JSONDecodeError, ValueError) as e:
            raise HTTPError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise HTTPError(400, "request body nests too deeply") from None
        try:
            req = schema.model_validate(data)
        except RecursionError:
            raise HTTPError(400, "request body nests too deeply") from None
        except ValidationError as e:
            first = e.errors()[0]
            raise HTTPError(
                400, f"invalid field {'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}"
            ) from None
        if getattr(req, "model", None) not in (None, self.model_name):
            raise HTTPError(
                404, f"model {req.model!r} does not exist; this server serves {self.model_name!r}", "model_not_found"
            )
        return req

    def params(self, req, default_max_tokens: int, logprobs: int | None, prompts: int = 1) -> SamplingParams:
        try:
            params = req.sampling_params(min(default_max_tokens, self.max_tokens), logprobs)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        if params.n * prompts > self.limits.max_n:  # a list of prompts takes n sequences each
            raise HTTPError(
                400,
                f"n ({params.n}) x prompts ({prompts}) is over this server's limit of {self.limits.max_n} (--max-n)",
            )
        if params.max_tokens > self.max_tokens:
            raise HTTPError(
                400,
                f"max_tokens ({params.max_tokens}) is over this server's limit of {self.max_tokens}"
                + (" (--max-tokens-cap)" if self.max_tokens < self.max_seq_len else " (max_seq_len)"),
            )
        return params

    def room_after(self, prompt_tokens: int) -> int:
        """Tokens that fit in max_seq_len after a prompt (vLLM's default max_tokens for chat; at most the cap)."""
        if prompt_tokens >= self.max_seq_len:
            raise HTTPError(400, f"prompt ({prompt_tokens} tokens) leaves no room in max_seq_len {self.max_seq_len}")
        return self.max_seq_len - prompt_tokens

    def tokenized(self, prompts: list, params: SamplingParams) -> list[list[int]]:
        """Token ids per prompt; a prompt that cannot fit with max_tokens is a 400 (as in vLLM)."""
        out = []
        for p in prompts:
            try:
                ids = self.llm.engine.tokenize(p)
            except ValueError as e:
                raise HTTPError(400, str(e)) from None
            if len(ids) + params.max_tokens > self.max_seq_len:
                raise HTTPError(
                    400,
                    f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                    f"max_seq_len {self.max_seq_len}",
                )
            out.append(ids)
        return out

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        ids = self.render(messages, tools, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def render(self, messages: list[dict], tools: list[dict] | None, tokenize: bool = False):
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=tokenize
            )
        except Exception as e:
            raise HTTPError(400, f"invalid chat messages: {e}") from None

    def tool_plan(self, req: ChatCompletionRequest):
        try:
            return req.tool_plan()
        except ValueError as e:
            raise HTTPError(400, str(e)) from None

    async def submit(self, prompt_ids: list[int], params: SamplingParams):
        try:
            return await self.llm.submit(prompt_ids, params, on_finish=self.metrics.observe_finished)
        except QueueFullError as e:
            raise HTTPError(503, f"server is busy: {e}", "server_busy", {"Retry-After": "1"}) from None
        except ValueError as e:
            raise HTTPError(400, str(e)) from None


def body(model: type[BaseModel], streams: bool = False) -> dict:
    """The route's JSON request body in /openapi.json: the routes parse bodies themselves (size, depth and
    non-finite checks before pydantic), so FastAPI cannot infer them. streams: 200 may be SSE."""
    doc = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }
    if streams:
        doc["responses"] = {
            "200": {
                "description": "the completion, or with stream=true its chunks as server-sent events",
                "content": {"application/json": {}, "text/event-stream": {}},
            }
        }
    return doc


def declare_bodies(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add the request models' JSON schemas to the app's OpenAPI components."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                spec = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(spec.pop("$defs", {}))
                components[model.__name__] = spec
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def build_app(
    llm: AsyncLLM, model_name: str, api_key: str | None = None, limits: RequestLimits = RequestLimits()
) -> FastAPI:
    errors = {
        status: {"model": ErrorResponse, "description": text}
        for status, text in (
            (400, "invalid request"),
            (401, "missing or wrong API key"),
            (404, "unknown model"),
            (413, "request body too large"),
            (503, "busy, or the engine failed"),
        )
    }
    app = FastAPI(title="SEDAC server", version=__version__, responses=errors)
    declare_bodies(
        app,
        [
            CompletionRequest,
            ChatCompletionRequest,
            GenerateRequest,
            BatchGenerateRequest,
            TokenizeRequest,
            DetokenizeRequest,
        ],
    )
    server = Server(llm, model_name, api_key, limits)
    max_body_bytes = limits.max_body_bytes
    app.state.server = server
    openai = OpenAIHandlers(server)

    @app.exception_handler(HTTPError)
    async def http_error(_, e: HTTPError):
        body = {"error": {"message": e.message, "type": e.kind, "param": None, "code": e.status}}
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        open_paths = ("/health", "/ready", "/stats", "/metrics", "/metrics/prometheus")
        if (
            api_key
            and request.url.path not in open_paths
            and request.headers.get("authorization") != f"Bearer {api_key}"
        ):
            return await http_error(request, HTTPError(401, "missing or wrong API key", "authentication_error"))
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            return await http_error(request, HTTPError(413, f"request body is over {max_body_bytes} bytes"))
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "owned_by": "sedac", "max_model_len": server.max_seq_len}],
        }

    @app.post("/v1/completions", openapi_extra=body(CompletionRequest, streams=True))
    async def completions(request: Request):
        return await openai.completions(await server.parse(request, CompletionRequest))

    @app.post("/v1/chat/completions", openapi_extra=body(ChatCompletionRequest, streams=True))
    async def chat(request: Request):
        return await openai.chat(await server.parse(request, ChatCompletionRequest))

    @app.post("/generate", openapi_extra=body(GenerateRequest))
    async def generate(request: Request):
        req = await server.parse(request, GenerateRequest)
        return (await _native_generate(server, req, [req.prompt]))[0]

    @app.post("/batch_generate", openapi_extra=body(BatchGenerateRequest))
    async def batch_generate(request: Request):
        req = await server.parse(request, BatchGenerateRequest)
        return {"results": await _native_generate(server, req, req.prompts, fail_alone=True)}

    @app.post("/tokenize", openapi_extra=body(TokenizeRequest))
    async def tokenize(request: Request):
        req = await server.parse(request, TokenizeRequest)
        if req.messages is not None:
            ids = server.chat_prompt([m.for_template() for m in req.messages])
        else:
            ids = server.tokenizer.encode(req.prompt, add_special_tokens=False)
        return {"count": len(ids), "max_model_len": server.max_seq_len, "tokens": ids}

    @app.post("/detokenize", openapi_extra=body(DetokenizeRequest))
    async def detokenize(request: Request):
        req = await server.parse(request, DetokenizeRequest)
        try:
            ids = llm.engine.tokenize(req.tokens)  # validates the ids against the vocabulary
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        return {"prompt": server.tokenizer.decode(ids)}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/health")
    async def health():
        if llm.error is not None:
            return JSONResponse({"status": "error", "detail": str(llm.error)}, status_code=503)
        return {"status": "ok", "model": model_name}

    @app.get("/ready")  # readiness: 503 until the engine has warmed up (health is liveness)
    async def ready():
        if llm.error is not None or not llm.ready.is_set():
            status = "error" if llm.error is not None else "warming up"
            return JSONResponse({"status": status}, status_code=503)
        return {"status": "ready", "model": model_name}

    @app.get("/stats")
    async def stats_json():
        return await llm.stats()

    prometheus_text = {200: {"description": "Prometheus text format", "content": {"text/plain": {}}}}

    @app.get("/metrics", responses=prometheus_text)  # Prometheus text where vLLM and TensorRT-LLM serve it
    @app.get("/metrics/prometheus", responses=prometheus_text)  # the original SEDAC path, kept as an alias
    async def metrics_prometheus():
        return Response(server.metrics.render(await llm.stats()), media_type="text/plain; version=0.0.4")

    return app


async def _native_generate(server: Server, req, prompts: list, fail_alone: bool = False) -> list[dict]:
    if req.max_new_tokens is not None:
        req.max_tokens = req.max_new_tokens
    params = server.params(req, default_max_tokens=128, logprobs=None, prompts=len(prompts))

    async def one(prompt):
        try:
            stream = await server.submit(server.tokenized([prompt], params)[0], params)
        except HTTPError as e:
            if fail_alone and e.status == 400:
                return {"error": e.message}
            raise
        out = await stream.final()
        return {
            "text": out.text,
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
            "metrics": out.metrics.as_dict(),
        }

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def serve(
    engine_dir: str,
    host: str,
    port: int,
    api_key: str | None,
    max_queue: int | None,
    device: str,
    model_name: str | None = None,
    engine_options: dict | None = None,
    limits: RequestLimits = RequestLimits(),
) -> None:
    """Run the server until Ctrl-C / SIGTERM: uvicorn drains connections, the engine stops, exit 0.
    engine_options: LLMEngine keyword arguments (max_num_seqs, sedac_mode, sedac_kv_fill, ...)."""
    from pathlib import Path

    import uvicorn

    from sedac.runtime.engine import LLMEngine

    class GracefulServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after shutting down, which would skip our cleanup.
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    llm = AsyncLLM(LLMEngine(engine_dir, device=device, **(engine_options or {})), max_queue=max_queue)
    app = build_app(llm, model_name or Path(engine_dir).resolve().name, api_key, limits)
    try:
        GracefulServer(
            uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        ).run()
    finally:
        llm.shutdown()
