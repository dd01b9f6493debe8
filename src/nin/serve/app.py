"""The HTTP API of ``nin serve``: :func:`create_app` builds a FastAPI app around a backend and a config.

Routes (OpenAPI at ``/openapi.json``, docs at ``/docs``):

* ``POST /v1/predict?top_k=K``: images as ``multipart/form-data`` file parts (any field names) or one image
  as the body (``Content-Type: image/*`` or ``application/octet-stream``); the top-k classes of each.
* ``POST /v1/cam?top_k=K&format=png|json``: one image; its top class's map over it (PNG), or the maps of its
  top-k classes (JSON). 409 for a model without class maps.
* ``GET /v1/model``: the model's card. ``GET /healthz``, ``GET /readyz``, ``GET /metrics`` (Prometheus).
* ``GET /`` and ``/page/...``: the web page.

Every error is a JSON body ``{"error": "<one line>"}`` with its status: 400 (a bad image, none, too many, a
bad parameter), 401 (``--api-key`` set and ``Authorization: Bearer KEY`` missing or wrong; it guards
``/v1/*`` and ``/metrics``), 409, 413 (a body over ``max_bytes``: by ``Content-Length`` before reading, or
while reading a body without one), 415 (another content type), 503 (the queue is full, or the server is not
running: ``Retry-After: 1``), 504 (``timeout_s`` passed). Nothing a client sends becomes a 500: that is left
for a fault of the server's, and even then the body is one JSON line, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from nin.serve.batcher import Batcher, Draining, QueueFull
from nin.serve.images import BadImage, cam_png, decode_request_image, small, unit_range
from nin.serve.metrics import Metrics

PAGE = Path(__file__).parent / "page"
MAX_TOP_K = 100_000
INLINE_PIXELS = 128 * 128  # one image of at most this many pixels is decoded on the event loop itself
INLINE_BYTES = 256 * 1024  # (a larger body is not even probed: its header is read once, in the thread)
IMAGE_TYPES = ("image/", "application/octet-stream")
_BINARY = {"type": "string", "format": "binary"}
IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "additionalProperties": _BINARY}},
    "image/*": {"schema": _BINARY}, "application/octet-stream": {"schema": _BINARY}}}}
PREDICT_EXAMPLE = {"model": "nin28", "version": "986c68d26ddd", "predictions": [
    {"file": "shoe.png", "top": [{"class": "Ankle boot", "probability": 0.981},
                                 {"class": "Sneaker", "probability": 0.012}]}]}
log = logging.getLogger("nin.serve")


def error(status: int, reason: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status, reason, headers=headers)


def create_app(backend, config, metrics: Metrics | None = None) -> FastAPI:
    """The app serving ``backend`` (:mod:`nin.serve.backends`) with ``config`` (a ServeConfig). Its lifespan
    starts the batcher and, at shutdown, drains it: requests already waiting are answered first."""
    config = config.validate()
    metrics = metrics or Metrics()
    batcher = Batcher(backend.infer, config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.drain()

    app = FastAPI(title="nin serve", version=backend.card["version"], lifespan=lifespan,
                  description=f"{backend.card['name']} ({backend.card.get('dataset') or 'its data set unknown'}) "
                              "behind dynamic batching.")
    app.state.backend, app.state.batcher, app.state.metrics, app.state.config = backend, batcher, metrics, config
    _add_error_handlers(app)

    async def authorized(request: Request) -> None:  # (async: no hop to a worker thread per request)
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                        {"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorized)]
    top_k_query = Query(None, ge=1, le=MAX_TOP_K, description=f"classes per image (default {config.top_k})")

    @app.post("/v1/predict", dependencies=guarded, openapi_extra=IMAGE_BODY, response_class=JSONResponse,
              responses={200: {"content": {"application/json": {"example": PREDICT_EXAMPLE}}}})
    async def predict(request: Request, top_k: int | None = top_k_query) -> JSONResponse:
        """The top-k classes of each image, most likely first."""
        async def answer():
            with batcher.incoming():
                names, images = await _images(request, backend, config)
            return await predictions(backend, batcher, names, images, top_k or config.top_k)

        # a JSONResponse as it is: FastAPI would otherwise walk the answer through jsonable_encoder first
        return JSONResponse(await within(answer(), config))

    @app.post("/v1/cam", dependencies=guarded, openapi_extra=IMAGE_BODY,
              responses={200: {"content": {"image/png": {}}}, 409: {"description": "no class maps"}})
    async def cam(request: Request, top_k: int = Query(3, ge=1, le=MAX_TOP_K),
                  format: Literal["png", "json"] = "png"):  # noqa: A002  (the query parameter's name)
        """Class activation maps of one image: its top class's map over it (png) or its top-k maps (json)."""
        if not backend.cam:
            raise error(409, "this model has no class maps (a fully connected head, a classic model, or an ONNX "
                             "file exported without --cam)")

        async def answer():
            with batcher.incoming():
                names, images = await _images(request, backend, config, one=True)
            probs, maps = await _submit(batcher, images, maps=True)
            top = _top(probs[0], backend.classes, top_k)
            index = {c: i for i, c in enumerate(backend.classes)}
            if format == "png":
                best = top[0]
                title = f"{best['class']} {best['probability']:.2f}"
                png = await asyncio.to_thread(cam_png, images[0], maps[0, index[best["class"]]], title)
                return Response(png, media_type="image/png")
            for t in top:
                t["map"] = np.round(unit_range(maps[0, index[t["class"]]]).astype(np.float64), 4).tolist()
            return {"model": backend.card["name"], "version": backend.card["version"], "file": names[0],
                    "size": list(images.shape[2:]), "top": top}

        return await within(answer(), config)

    @app.get("/v1/model", dependencies=guarded)
    def model() -> dict:
        """What the model is: name, version, parameters, data set, classes, input, accuracy, batching."""
        return {**backend.card, "cam": backend.cam,
                "batching": {"enabled": config.batching, "max_batch": config.max_batch,
                             "max_delay_ms": config.max_delay_ms}}

    @app.get("/healthz")
    def healthz() -> dict:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "starting or draining"}})
    def readyz() -> dict:
        """The model is loaded and requests are being batched (503 while starting or shutting down)."""
        if not batcher.running:
            raise error(503, "not ready: starting or shutting down", {"Retry-After": "1"})
        return {"status": "ready"}

    @app.get("/metrics", dependencies=guarded, response_class=Response)
    def prometheus() -> Response:
        """Requests, latency, batch sizes and the queue, in the Prometheus text format."""
        body, content_type = metrics.text()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    def page():
        if not (PAGE / "index.html").is_file():
            raise error(404, "the web page is not installed")
        return FileResponse(PAGE / "index.html", media_type="text/html")

    app.mount("/page", StaticFiles(directory=PAGE, check_dir=False), name="page")
    routes = {r.path for r in app.routes}
    from nin.serve.fastpath import FastPredict  # (it uses this module's functions)

    app.add_middleware(FastPredict, backend=backend, batcher=batcher, config=config)  # inside Guard
    app.add_middleware(Guard, max_bytes=config.max_bytes, metrics=metrics, routes=routes)
    return app


async def within(work, config):
    """``work`` awaited, or 504 once ``config.timeout_s`` have passed."""
    try:
        if sys.version_info >= (3, 11):  # a deadline on this task: no task of its own per request
            async with asyncio.timeout(config.timeout_s):
                return await work
        return await asyncio.wait_for(work, config.timeout_s)
    except (TimeoutError, asyncio.TimeoutError):  # one class from 3.11 on
        raise error(504, f"no answer within {config.timeout_s:g} s (--timeout)") from None


async def predictions(backend, batcher: Batcher, names: list[str], images: np.ndarray, top_k: int) -> dict:
    """The answer of ``POST /v1/predict``: the top ``top_k`` classes of each decoded image, batched."""
    probs, _ = await _submit(batcher, images, maps=False)
    return {"model": backend.card["name"], "version": backend.card["version"],
            "predictions": [{"file": name, "top": _top(p, backend.classes, top_k)} for name, p in zip(names, probs)]}


async def _submit(batcher: Batcher, images: np.ndarray, maps: bool):
    try:
        return await batcher.submit(images, maps)
    except QueueFull as e:
        raise error(503, f"busy: {e}; retry later", {"Retry-After": "1"}) from None
    except Draining as e:
        raise error(503, f"not ready: {e}", {"Retry-After": "1"}) from None


def _top(probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[:min(k, len(classes))]
    return [{"class": classes[i], "probability": float(probs[i])} for i in order]


async def _images(request: Request, backend, config, one: bool = False) -> tuple[list[str], np.ndarray]:
    """The names and decoded images (uint8 ``[N, C, H, W]``) a request sends; 400 or 415 when it sends none."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    parts: list[tuple[str, bytes]] = []
    if media == "multipart/form-data":
        form = await request.form(max_files=config.max_images, max_fields=config.max_images + 16)
        try:
            for field, value in form.multi_items():
                if isinstance(value, UploadFile):
                    parts.append((value.filename or field, await value.read()))
        finally:
            await form.close()
    elif media.startswith(IMAGE_TYPES):
        parts.append(("body", await request.body()))
    else:
        raise error(415, f"unsupported content type {media or '(none)'!r}: send image files as "
                         "multipart/form-data, or one image as the body with Content-Type image/*")
    if not parts:
        raise error(400, "no image in the request: send image files as multipart/form-data parts")
    if one and len(parts) > 1:
        raise error(400, f"send one image, not {len(parts)}")
    return [name for name, _ in parts], await decoded(parts, backend, config)


async def decoded(parts: list[tuple[str, bytes]], backend, config) -> np.ndarray:
    """The images of ``parts`` (name, encoded bytes) as uint8 ``[N, C, H, W]`` at the model's stored size; 400
    for too many, or for one that is not a usable image."""
    if len(parts) > config.max_images:
        raise error(400, f"too many images: {len(parts)}, at most {config.max_images} (--max-images)")
    shape = backend.channels, tuple(backend.stored_size)

    def decode_all() -> np.ndarray:
        return np.stack([decode_request_image(data, name, *shape, config.max_pixels) for name, data in parts])

    # A small image decodes faster than the hand-over to a thread and back (a 28x28 PNG: about 0.1 ms); a larger
    # one is decoded in a thread, so that it never holds up the event loop.
    inline = len(parts) == 1 and len(parts[0][1]) <= INLINE_BYTES and small(parts[0][1], INLINE_PIXELS)
    try:
        return decode_all() if inline else await asyncio.to_thread(decode_all)
    except BadImage as e:
        raise error(400, str(e)) from None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": one_line(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        reasons = [f"{e['loc'][-1]}: {e['msg']}" if e.get("loc") else e.get("msg", "") for e in exc.errors()]
        return JSONResponse({"error": one_line("; ".join(reasons) or "bad request")}, 400)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect) -> JSONResponse:  # the client's doing, not a fault
        return JSONResponse({"error": GONE}, 400)

    @app.exception_handler(Exception)
    async def fault(request: Request, exc: Exception) -> JSONResponse:
        return fault_response(f"{request.method} {request.url.path}", exc)


GONE = "the client closed the connection before the whole body arrived"


def fault_response(what: str, exc: Exception) -> JSONResponse:
    """A fault of ours: logged with its traceback, and one JSON line (500) to the client."""
    log.error("%s failed", what, exc_info=exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server's log"}, 500)


def one_line(text: object) -> str:
    return " ".join(str(text).split())[:500]


class BodyTooLarge(Exception):
    """A request body went past ``max_bytes`` while it was being read."""


class Guard:
    """Pure ASGI middleware around every HTTP request: refuses a body over ``max_bytes`` with 413 (by its
    ``Content-Length`` before anything is read, or as soon as a streamed body passes it), and counts each
    answer in the metrics by route and status, with its time."""

    def __init__(self, app, max_bytes: int, metrics: Metrics, routes: set[str]) -> None:
        self.app, self.max_bytes, self.metrics, self.routes = app, max_bytes, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, started, received = time.perf_counter(), 500, False, 0
        path = scope.get("path", "")
        route = path if path in self.routes else "/page" if path.startswith("/page/") else "other"

        async def sending(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        async def receiving():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        too_large = f"request body over {self.max_bytes:,} bytes (--max-bytes)"
        try:
            declared = dict(scope.get("headers") or []).get(b"content-length", b"")
            if declared.strip().isdigit() and int(declared) > self.max_bytes:
                return await _send_json(sending, 413, too_large)
            try:
                await self.app(scope, receiving, sending)
            except BodyTooLarge:
                if started:
                    raise
                await _send_json(sending, 413, too_large)
        finally:
            self.metrics.answered(route, status, time.perf_counter() - start)


async def _send_json(send, status: int, reason: str) -> None:
    response = JSONResponse({"error": reason}, status, headers={"Connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
