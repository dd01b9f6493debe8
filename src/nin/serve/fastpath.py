"""The hot path of ``nin serve``: ``POST /v1/predict`` with one image as the raw body, answered in plain ASGI.

Under load the event loop is what limits a small model's requests per second: each request is parsed, routed,
validated and answered on it, and a forward pass of a batch of 28x28 images costs less than that. FastAPI's
routing, dependency resolution and query validation cost more per request than the work itself, so the commonest
request (the form the load benchmark and most clients send) skips them:

* ``POST /v1/predict`` with ``Content-Type: image/*`` or ``application/octet-stream``,
* no query string, or only ``top_k=K`` with ``1 <= K <= MAX_TOP_K``,
* and, when the server has an API key, the right ``Authorization: Bearer KEY``.

:class:`FastPredict` answers such a request itself, with the same functions the FastAPI route calls
(:func:`nin.serve.app.decoded`, :func:`~nin.serve.app.predictions`, :func:`~nin.serve.app.within`), so the
answer, every error (400, 503 with ``Retry-After``, 504) and the metrics are the same. Any other request
(multipart, another parameter, a wrong key, a bad ``top_k``) goes on to FastAPI, which answers it as before, with
its OpenAPI description. It sits inside :class:`~nin.serve.app.Guard`, so body limits (413) and the request
metrics apply to it as to every route.
"""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from nin.serve import app as api

ROUTE = "/v1/predict"


class FastPredict:
    """Pure ASGI middleware: answers the plain form of ``POST /v1/predict`` (see the module), passes the rest on."""

    def __init__(self, app, backend, batcher, config) -> None:
        self.app, self.backend, self.batcher, self.config = app, backend, batcher, config
        self.bearer = None if config.api_key is None else config.api_key.encode()

    def top_k(self, scope) -> int | None:
        """The request's top-k when this path may answer it, else None (FastAPI will)."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != ROUTE:
            return None
        query = scope.get("query_string", b"")
        k = self.config.top_k
        if query:
            name, _, value = query.partition(b"=")
            if name != b"top_k" or not value.isdigit() or len(value) > 7 or not 1 <= int(value) <= api.MAX_TOP_K:
                return None
            k = int(value)
        media = auth = b""
        for key, value in scope["headers"]:
            if key == b"content-type":
                media = value.split(b";")[0].strip().lower()
            elif key == b"authorization":
                auth = value
        if not media.startswith((b"image/", b"application/octet-stream")):
            return None
        if self.bearer is not None:
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.bearer):
                return None
        return k

    async def __call__(self, scope, receive, send) -> None:
        k = self.top_k(scope)
        if k is None:
            return await self.app(scope, receive, send)
        try:
            response = JSONResponse(await api.within(self.answer(receive, k), self.config))
        except HTTPException as e:
            response = JSONResponse({"error": api.one_line(e.detail)}, e.status_code, headers=e.headers)
        except ClientDisconnect:
            response = JSONResponse({"error": api.GONE}, 400)
        except api.BodyTooLarge:
            raise  # Guard answers 413
        except Exception as e:  # noqa: BLE001  a fault of ours
            response = api.fault_response(f"POST {ROUTE}", e)
        await response(scope, receive, send)

    async def answer(self, receive, k: int) -> dict:
        with self.batcher.incoming():
            chunks = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            images = await api.decoded([("body", b"".join(chunks))], self.backend, self.config)
        return await api.predictions(self.backend, self.batcher, ["body"], images, k)
