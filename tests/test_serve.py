"""nin serve: the HTTP API against the app in this process (every status code of the contract, answers equal to
nin predict's, batching, metrics), then a real server process (SIGTERM, load errors, ONNX without torch)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from conftest import assert_one_error_line, run_cli
from PIL import Image, ImageFile

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from nin.serve.app import create_app  # noqa: E402
from nin.serve.backends import load_backend, resize_bilinear  # noqa: E402
from nin.serve.config import ServeConfig  # noqa: E402
from nin.serve.images import BadImage, decode_request_image  # noqa: E402


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def serving(backend, **settings):
    """The app, started (its lifespan: the batcher runs), and a client that calls it in this process."""
    app = create_app(backend, ServeConfig(**settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://nin.test", timeout=60) as client:
            yield app, client


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header declares width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


PNG = {"content-type": "image/png"}
pytestmark = pytest.mark.usefixtures("one_thread")  # a forward pass of a few images is fastest on one thread


class Counting:
    """A backend whose forward passes are counted (images in each), and can be held until ``gate`` is set."""

    def __init__(self, backend, gate: threading.Event | None = None) -> None:
        self.backend, self.gate, self.calls, self.entered = backend, gate, [], threading.Event()

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def infer(self, images, maps):
        self.calls.append(len(images))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        return self.backend.infer(images, maps)


@pytest.fixture(scope="module")
def backend(tiny_run):
    return load_backend(tiny_run, ServeConfig(device="cpu"))


@pytest.fixture(scope="module")
def files(tiny_run, tmp_path_factory):
    """Four real test images as files: three 28x28 PNGs and a 36x30 RGB JPEG (cropped and converted)."""
    from nin.inference.trained import load_trained

    images = load_trained(tiny_run, "cpu").test_split().images[:3, 0].numpy()
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, img in enumerate(images):
        paths.append(root / f"test{i}.png")
        paths[-1].write_bytes(png(img))
    paths.append(root / "wide.jpg")
    Image.fromarray(np.stack([images[0]] * 3, -1)).resize((36, 30)).save(paths[-1], quality=90)
    return paths


def top_of(prediction) -> list[tuple[str, float]]:
    return [(t["class"], t["probability"]) for t in prediction["top"]]


def assert_same_top(got: list[tuple[str, float]], want: list[tuple[str, float]], tolerance: float = 1e-6) -> None:
    """The same classes in the same order, with probabilities within ``tolerance``."""
    assert [c for c, _ in got] == [c for c, _ in want]
    assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=tolerance)


# ------------------------------------------------------------------------------------------ answers


@pytest.mark.slow
def test_predictions_are_nin_predicts_on_the_same_files(tiny_run, backend, files):
    from nin.inference.predict import predict_files
    from nin.inference.trained import load_trained

    want, bad = predict_files(load_trained(tiny_run, "cpu"), files, top_k=3)
    assert bad == [] and len(want) == 4

    async def go():
        async with serving(backend) as (_, client):
            parts = [("image", (f.name, f.read_bytes(), "application/octet-stream")) for f in files]
            many = await client.post("/v1/predict?top_k=3", files=parts)
            one = await client.post("/v1/predict?top_k=3", content=files[3].read_bytes(),
                                    headers={"content-type": "image/jpeg"})
            return many, one

    many, one = run(go())
    assert many.status_code == 200 and one.status_code == 200
    doc = many.json()
    version = hashlib.sha256((backend.path / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert doc["model"] == "nin28" and doc["version"] == version
    assert [p["file"] for p in doc["predictions"]] == [f.name for f in files]
    assert one.json()["predictions"][0]["file"] == "body"
    for got, expected in zip([*doc["predictions"], *one.json()["predictions"]], [*want, want[3]]):
        assert_same_top(top_of(got), expected.top)
        assert set(got) == set(expected.to_dict())  # the shape of Prediction.to_dict()


def test_the_fast_path_answers_a_raw_body_as_the_fastapi_route_does(backend, files, monkeypatch):
    """POST /v1/predict with one raw image (and at most top_k) skips FastAPI (nin.serve.fastpath): the same answer,
    the same errors and the same metrics as through the route, which any other form of the request takes."""
    from nin.serve.fastpath import FastPredict

    taken = []
    real = FastPredict.answer
    monkeypatch.setattr(FastPredict, "answer", lambda self, receive, k: taken.append(k) or real(self, receive, k))
    good, jpeg = files[0].read_bytes(), files[3].read_bytes()

    async def go():
        async with serving(backend, api_key="k3y", top_k=4) as (app, client):
            key = {"authorization": "Bearer k3y"}

            async def both(body, query="", kind="image/png"):
                fast = await client.post(f"/v1/predict{query}", content=body, headers={"content-type": kind, **key})
                # another query parameter: FastAPI ignores it, this path passes the request on
                joiner = "&" if query else "?"
                route = await client.post(f"/v1/predict{query}{joiner}via=route", content=body,
                                          headers={"content-type": kind, **key})
                return fast, route

            pairs = {"default top_k": await both(good), "top_k 2": await both(good, "?top_k=2"),
                     "jpeg": await both(jpeg, kind="image/jpeg"),
                     "octet": await both(good, kind="application/octet-stream; charset=x"),
                     "bad image": await both(b"GIF89a but not really"), "empty": await both(b"")}
            declined = [await client.post(path, content=good, headers={**PNG, **headers}) for path, headers in
                        (("/v1/predict?top_k=0", key), ("/v1/predict?top_k=all", key), ("/v1/predict", {}))]
            metrics = (await client.get("/metrics", headers=key)).text
            return pairs, declined, metrics

    pairs, declined, metrics = run(go())
    for name, (fast, route) in pairs.items():
        assert (fast.status_code, fast.json()) == (route.status_code, route.json()), name
        assert fast.headers["content-type"] == route.headers["content-type"] == "application/json", name
    assert pairs["top_k 2"][0].status_code == 200 and len(pairs["top_k 2"][0].json()["predictions"][0]["top"]) == 2
    assert len(pairs["default top_k"][0].json()["predictions"][0]["top"]) == 4
    assert pairs["bad image"][0].status_code == 400 and pairs["empty"][0].status_code == 400
    assert taken == [4, 2, 4, 4, 4, 4]  # each first of a pair, and none of the declined requests
    assert [r.status_code for r in declined] == [400, 400, 401]
    assert 'nin_requests_total{route="/v1/predict",status="200"} 8.0' in metrics
    assert 'nin_requests_total{route="/v1/predict",status="400"} 6.0' in metrics


def test_a_request_image_decodes_as_its_file_does(files):
    from nin.data.images import decode_image
    from nin.inference.predict import FIT
    from nin.serve import images

    assert images.FIT == FIT
    for f in files:
        for channels, size in ((1, (28, 28)), (3, (20, 24))):
            got = decode_request_image(f.read_bytes(), f.name, channels, size, 10**6)
            assert np.array_equal(got, decode_image(f, channels, size, FIT)), (f, channels)


def test_the_numpy_resize_is_torchs_bilinear():
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(0).random((2, 3, 28, 30), dtype=np.float32)
    for size in ((224, 224), (17, 45), (28, 30)):
        want = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False).numpy()
        np.testing.assert_allclose(resize_bilinear(x, size), want, atol=2e-6)


def test_the_model_card_comes_from_the_run(tiny_run, backend):
    run_dir = tiny_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    date = json.loads((run_dir / "config.json").read_text())["env"]["date"][:10]

    async def go():
        async with serving(backend, max_batch=7, batching=False) as (_, client):
            return (await client.get("/v1/model")).json()

    card = run(go())
    assert card == {"name": "nin28", "version": backend.card["version"], "parameters": 79_898,
                    "dataset": "fashion-mnist", "classes": backend.classes,
                    "input": {"channels": 1, "height": 28, "width": 28}, "test_accuracy": rows[-1]["test_acc"],
                    "test_accuracy_tta": False, "trained": date, "runtime": "torch", "cam": True,
                    "batching": {"enabled": False, "max_batch": 7, "max_delay_ms": 5.0}}


def test_the_card_says_when_the_run_scored_its_test_accuracy_with_flip_tta(tiny_run, tmp_path):
    """A run trained with --tta (the fast preset) recorded the accuracy of flip-averaged predictions; a request is
    one forward pass, so the card says which the accuracy is."""
    import shutil

    from nin.inference.card import model_card
    from nin.inference.trained import load_trained
    from nin.training import checkpoint as ckpt

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, symlinks=True)
    meta_file = ckpt.resolve(run_dir) / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert model_card(load_trained(run_dir, "cpu"))["test_accuracy_tta"] is False
    meta["config"]["train"]["tta"] = True
    meta_file.write_text(json.dumps(meta))
    card = model_card(load_trained(run_dir, "cpu"))
    assert card["test_accuracy_tta"] is True and card["test_accuracy"] is not None


def test_cam_draws_the_top_class_map_or_returns_the_maps(backend, files):
    async def go():
        async with serving(backend) as (_, client):
            body = files[0].read_bytes()
            return (await client.post("/v1/cam", content=body, headers=PNG),
                    await client.post("/v1/cam?format=json&top_k=2", content=body, headers=PNG),
                    await client.post("/v1/predict?top_k=2", content=body, headers=PNG))

    picture, maps, predicted = run(go())
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).size[0] > 2 * 256
    doc = maps.json()
    assert doc["size"] == [28, 28] and doc["file"] == "body" and len(doc["top"]) == 2
    assert [(t["class"], t["probability"]) for t in doc["top"]] == top_of(predicted.json()["predictions"][0])
    m = np.array(doc["top"][0]["map"])
    assert m.shape == (7, 7) and m.min() == 0 and m.max() == 1


# ------------------------------------------------------------------------------------------ batching


@pytest.mark.slow
def test_concurrent_requests_share_forward_passes(backend, files):
    counting = Counting(backend)
    body = files[0].read_bytes()

    async def go(**settings):
        async with serving(counting, **settings) as (_, client):
            return await asyncio.gather(*(client.post("/v1/predict", content=body, headers=PNG) for _ in range(8)))

    answers = run(go(max_batch=8, max_delay_ms=2000))  # a pass goes once it holds 8 images, or after 2 s
    assert [r.status_code for r in answers] == [200] * 8
    assert sum(counting.calls) == 8 and len(counting.calls) < 8 and max(counting.calls) > 1, counting.calls
    assert all(r.json()["predictions"] == answers[0].json()["predictions"] for r in answers)

    counting.calls.clear()
    alone = run(go(batching=False, max_batch=8, max_delay_ms=2000))
    assert [r.status_code for r in alone] == [200] * 8 and counting.calls == [1] * 8
    for a, b in zip(alone, answers):
        assert_same_top(top_of(a.json()["predictions"][0]), top_of(b.json()["predictions"][0]))


def test_a_lone_request_does_not_wait_for_others_that_are_not_coming(backend, files):
    """The batcher waits up to --max-delay-ms only for requests on their way (being read or decoded): a request
    with none behind it runs at once, so batching costs a lone client nothing."""
    counting = Counting(backend)

    async def go():
        async with serving(counting, max_delay_ms=5000) as (_, client):
            start = time.perf_counter()
            r = await client.post("/v1/predict", content=files[0].read_bytes(), headers=PNG)
            return r, time.perf_counter() - start

    r, seconds = run(go())
    assert r.status_code == 200 and counting.calls == [1]
    assert seconds < 2.5, f"a lone request waited {seconds:.2f} s for a batch (--max-delay-ms 5000)"


def test_a_client_that_leaves_mid_body_is_a_4xx_not_a_fault(backend):
    """A client that disconnects before its body ends is the client's doing: a 400, and no 500 in the metrics."""
    async def go():
        app = create_app(backend, ServeConfig())
        sent = []
        messages = iter([{"type": "http.request", "body": b"\x89PNG", "more_body": True}, {"type": "http.disconnect"}])

        async def receive():
            return next(messages, {"type": "http.disconnect"})

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"image/png"), (b"content-length", b"1000")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
        return sent, app.state.metrics.text()[0].decode()

    sent, metrics = run(go())
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 400
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert "closed the connection" in json.loads(body)["error"]
    assert 'status="500"' not in metrics and 'route="/v1/predict",status="400"' in metrics


def test_a_full_queue_is_503_with_retry_after_and_the_queued_requests_are_answered(backend, files):
    gate = threading.Event()
    held = Counting(backend, gate)
    body = files[0].read_bytes()

    async def go():
        async with serving(held, max_queue=1, max_delay_ms=0) as (app, client):
            try:
                first = asyncio.create_task(client.post("/v1/predict", content=body, headers=PNG))
                assert await asyncio.to_thread(held.entered.wait, 30)  # in the forward pass, held there
                second = asyncio.create_task(client.post("/v1/predict", content=body, headers=PNG))
                for _ in range(3000):
                    if app.state.batcher.waiting == 1:
                        break
                    await asyncio.sleep(0.01)
                refused = await client.post("/v1/predict", content=body, headers=PNG)
            finally:
                gate.set()
            return refused, await first, await second

    refused, first, second = run(go())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "busy" in refused.json()["error"] and "--max-queue 1" in refused.json()["error"]
    assert first.status_code == 200 and second.status_code == 200


def test_a_request_past_its_timeout_is_504(backend, files):
    gate = threading.Event()
    held = Counting(backend, gate)

    async def go():
        async with serving(held, timeout_s=0.2) as (_, client):
            try:
                return await client.post("/v1/predict", content=files[0].read_bytes(), headers=PNG)
            finally:
                gate.set()

    r = run(go())
    assert r.status_code == 504 and r.json() == {"error": "no answer within 0.2 s (--timeout)"}


# ------------------------------------------------------------------------------------------ refusals


def test_bad_requests_are_4xx_with_a_one_line_json_reason(backend, files, monkeypatch):
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    good = files[0].read_bytes()
    big = png(np.zeros((200, 200), np.uint8))

    async def go():
        async with serving(backend, max_bytes=50_000, max_images=2, max_pixels=30_000) as (_, client):
            async def post(path="/v1/predict", **kw):
                return await client.post(path, **kw)

            sent = []

            async def chunks():  # a body without Content-Length, sent as it streams
                for i in range(200):
                    sent.append(i)
                    yield b"\0" * 1000

            image = ("a", ("a.png", good, "image/png"))
            return {
                "not an image": await post(content=b"GIF89a but not really", headers=PNG),
                "truncated": await post(content=good[: len(good) // 2], headers=PNG),
                "empty": await post(content=b"", headers=PNG),
                "bomb": await post(content=png_header(5000, 5000), headers=PNG),
                "too many pixels": await post(content=big, headers=PNG),
                "no image": await post(files={"note": (None, "hello")}),  # a form with no file part
                "too many images": await post(files=[image, image, image]),
                "two to cam": await post("/v1/cam", files=[image, image]),
                "top_k 0": await post("/v1/predict?top_k=0", content=good, headers=PNG),
                "top_k word": await post("/v1/predict?top_k=all", content=good, headers=PNG),
                "format": await post("/v1/cam?format=gif", content=good, headers=PNG),
                "text": await post(content=good, headers={"content-type": "text/plain"}),
                "no type": await post(content=good, headers={"content-type": ""}),
                "json": await post(json={"image": "x"}),
                "length": await post(content=b"\0" * 60_000, headers=PNG),
                "chunked": await post(content=chunks(), headers=PNG),
                "unknown": await client.get("/v2/nothing"),
                "method": await client.get("/v1/predict"),
            }, sent

    answers, sent = run(go())
    expected = {"not an image": (400, "body: cannot decode image: cannot identify image file 'body'"),
                "truncated": (400, "body: cannot decode image"), "empty": (400, "body: empty, not an image"),
                "bomb": (400, "5000x5000 = 25,000,000 pixels, above the cap of 30,000"),
                "too many pixels": (400, "200x200 = 40,000 pixels, above the cap of 30,000"),
                "no image": (400, "no image in the request"), "too many images": (400, "Too many files"),
                "two to cam": (400, "send one image, not 2"), "top_k 0": (400, "top_k: Input should be greater"),
                "top_k word": (400, "top_k: Input should be a valid integer"),
                "format": (400, "format: Input should be 'png' or 'json'"),
                "text": (415, "unsupported content type 'text/plain'"), "no type": (415, "'(none)'"),
                "json": (415, "'application/json'"), "length": (413, "request body over 50,000 bytes"),
                "chunked": (413, "request body over 50,000 bytes"), "unknown": (404, "Not Found"),
                "method": (405, "Method Not Allowed")}
    for name, (status, needle) in expected.items():
        r = answers[name]
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json" and set(r.json()) == {"error"}, name
        assert needle in r.json()["error"] and "\n" not in r.json()["error"], (name, r.json())
    assert len(sent) < 200  # refused while streaming, not after the whole body
    assert (200, 200) not in decoded and (5000, 5000) not in decoded  # refused before their pixels were decoded


def test_the_api_key_guards_v1_and_metrics_only(backend, files):
    async def go():
        async with serving(backend, api_key="s3cret-key") as (_, client):
            body = files[0].read_bytes()
            no_key = await client.post("/v1/predict", content=body, headers=PNG)
            wrong = await client.post("/v1/predict", content=body, headers={**PNG, "authorization": "Bearer nope"})
            right = await client.post("/v1/predict", content=body,
                                      headers={**PNG, "authorization": "Bearer s3cret-key"})
            others = {path: (await client.get(path)).status_code
                      for path in ("/v1/model", "/metrics", "/healthz", "/readyz", "/openapi.json")}
            return no_key, wrong, right, others

    no_key, wrong, right, others = run(go())
    for r in (no_key, wrong):
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"error": "missing or wrong API key: send 'Authorization: Bearer KEY'"}
    assert right.status_code == 200
    assert others == {"/v1/model": 401, "/metrics": 401, "/healthz": 200, "/readyz": 200, "/openapi.json": 200}


@pytest.fixture(scope="module")
def fc_checkpoint(tiny_run, tmp_path_factory):
    """A checkpoint of nin28 with a fully connected head (untrained): a model without class maps."""
    from nin.models import create_model
    from nin.training import checkpoint as ckpt

    meta = json.loads((ckpt.resolve(tiny_run) / "meta.json").read_text())
    meta = {k: v for k, v in meta.items() if k in ("model", "data", "config")}
    meta["model"]["options"] = {**meta["model"].get("options", {}), "head": "fc"}
    meta["config"]["model"]["options"] = {**meta["config"]["model"].get("options", {}), "head": "fc"}
    out = tmp_path_factory.mktemp("fc") / "step-0000001"
    return ckpt.save_checkpoint(out, create_model(meta["model"]["name"], **meta["model"]["options"]), {}, meta)


def test_cam_of_a_model_without_class_maps_is_409(fc_checkpoint, files):
    fc = load_backend(fc_checkpoint, ServeConfig(device="cpu"))

    async def go():
        async with serving(fc) as (_, client):
            return (await client.post("/v1/cam", content=files[0].read_bytes(), headers=PNG),
                    await client.get("/v1/model"), await client.post("/v1/predict", content=files[0].read_bytes(),
                                                                     headers=PNG))

    cam, card, predicted = run(go())
    assert cam.status_code == 409 and "no class maps" in cam.json()["error"]
    assert card.json()["cam"] is False and card.json()["test_accuracy"] is None  # no run around it
    assert predicted.status_code == 200


# ------------------------------------------------------------------------------------------ operations


def test_health_readiness_metrics_and_openapi(backend, files):
    app = create_app(backend, ServeConfig())

    async def before_start():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://nin.test") as c:
            return await c.get("/readyz"), await c.get("/healthz")

    not_ready, alive = run(before_start())
    assert not_ready.status_code == 503 and "not ready" in not_ready.json()["error"]
    assert alive.status_code == 200 and alive.json() == {"status": "ok"}

    async def go():
        async with serving(backend) as (_, client):
            await client.post("/v1/predict", content=files[0].read_bytes(), headers=PNG)
            await client.post("/v1/predict", content=b"junk", headers=PNG)
            return (await client.get("/readyz"), await client.get("/metrics"), await client.get("/openapi.json"),
                    await client.get("/"), await client.get("/page/app.js"))

    ready, metrics, openapi, page, script = run(go())
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'nin_requests_total{route="/v1/predict",status="200"} 1.0' in text
    assert 'nin_requests_total{route="/v1/predict",status="400"} 1.0' in text
    assert 'nin_request_seconds_count{route="/v1/predict"} 2.0' in text
    assert "nin_batch_images_count 1.0" in text and "nin_batch_images_sum 1.0" in text
    assert "nin_forward_seconds_count 1.0" in text and "nin_queue_images 0.0" in text
    paths = openapi.json()["paths"]
    assert {"/v1/predict", "/v1/cam", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/predict"]["post"]["requestBody"]["content"]


def test_a_fault_of_the_server_is_a_500_with_one_json_line(backend, files):
    class Broken(Counting):
        def infer(self, images, maps):
            raise RuntimeError("the model fell over\nwith a second line")

    async def go():
        app = create_app(Broken(backend), ServeConfig(timeout_s=5))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://nin.test") as client:
                return [await client.post("/v1/predict", content=files[0].read_bytes(), headers=PNG)
                        for _ in range(2)]

    for failed in run(go()):  # the second reaches the model too: the batcher's worker goes on (not a 504)
        assert failed.status_code == 500
        assert failed.json() == {"error": "internal error (RuntimeError); see the server's log"}


def test_bad_serve_flags_and_a_missing_extra_are_one_line(capsys, tmp_path, monkeypatch):
    for argv, needle in ((["--port", "70000"], "--port"), (["--max-batch", "0"], "--max-batch"),
                         (["--timeout", "0"], "--timeout"), (["--api-key", ""], "api key")):
        assert_one_error_line(*run_cli(capsys, "serve", tmp_path, *argv), needle)
    assert_one_error_line(*run_cli(capsys, "serve", tmp_path / "none"), "none")  # before anything listens
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert_one_error_line(*run_cli(capsys, "serve", tmp_path), "nin serve needs uvicorn: pip install 'nin[serve]'")


def test_a_port_in_use_is_one_line():
    from nin.errors import NinError
    from nin.serve.server import bind

    taken = bind("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(NinError, match=rf"^cannot listen on 127\.0\.0\.1:{port}: address already in use$"):
            bind("127.0.0.1", port)
    finally:
        taken.close()


# ------------------------------------------------------------------------------------------ a real server


@contextlib.contextmanager
def server(*argv, prelude: str = "", stderr=None):
    """``nin serve ARGV --port 0`` in a process of its own; yields it and its URL once it prints that it
    listens. Always killed at the end."""
    code = f"{prelude}import sys; from nin.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", *map(str, argv), "--port", "0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=stderr or subprocess.DEVNULL, text=True)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=120), "no listening line within 120 s"
        line = proc.stdout.readline()
        found = re.fullmatch(r"nin serve: \w+ on (http://127\.0\.0\.1:\d+/) \(batching .*\)\n", line)
        assert found, (line, proc.poll())
        yield proc, found.group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


@pytest.mark.slow
def test_a_real_server_predicts_and_finishes_a_request_in_flight_on_sigterm(tiny_run, backend, files):
    """SIGTERM arrives while a request's body is half sent: the server stops listening but answers that
    request once the rest arrives (200, the right classes), then exits 0."""
    import socket
    from urllib.parse import urlsplit

    body = files[1].read_bytes()
    with server(tiny_run) as (proc, url):
        with httpx.Client(base_url=url, timeout=30) as probe:
            assert probe.post("/v1/predict", content=body, headers=PNG).status_code == 200  # it predicts
            where = urlsplit(url)
            with socket.create_connection((where.hostname, where.port), timeout=60) as sock:
                head = (f"POST /v1/predict HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: image/png\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()
                sock.sendall(head + body[:10])
                for _ in range(600):  # the server is reading it
                    if "nin_requests_incoming 1.0" in probe.get("/metrics").text:
                        break
                    time.sleep(0.01)
                else:
                    pytest.fail("the server never started reading the request")
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                sock.sendall(body[10:])
                answer = b""
                while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        assert proc.wait(60) == 0
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 200"), answer[:200]
    got = json.loads(rest.partition(b"\r\n\r\n")[2])
    expected = run(_predict_in_process(backend, body))
    assert_same_top(top_of(got["predictions"][0]), expected)


def _length(response: bytes) -> int:
    """The Content-Length of an HTTP response's head (0 until it has one)."""
    found = re.search(rb"(?im)^content-length:\s*(\d+)", response.partition(b"\r\n\r\n")[0])
    return int(found.group(1)) if found else 0


async def _predict_in_process(backend, body):
    async with serving(backend) as (_, client):
        return top_of((await client.post("/v1/predict", content=body, headers=PNG)).json()["predictions"][0])


@pytest.mark.slow
@pytest.mark.parametrize("what", ["no checkpoint", "junk onnx"])
def test_a_model_that_cannot_be_loaded_is_one_line_and_exit_2(tmp_path, what):
    path = tmp_path / "empty-run"
    path.mkdir()
    if what == "junk onnx":
        path = tmp_path / "model.onnx"
        path.write_bytes(b"not a model")
        path.with_name("model.onnx.json").write_text(json.dumps(
            {"model": "nin28", "classes": ["a", "b"], "input": {"shape": ["batch", 1, 28, 28]}}))
    done = subprocess.run([sys.executable, "-m", "nin", "serve", str(path), "--port", "0"], capture_output=True,
                          text=True, timeout=120)
    assert_one_error_line(done.returncode, done.stdout, done.stderr, str(path))


@pytest.fixture(scope="module")
def onnx_files(tiny_run, tmp_path_factory):
    """The tiny run exported to ONNX twice: with --cam (class maps as a second output) and without."""
    pytest.importorskip("onnxruntime")
    from nin.cli.main import main

    root = tmp_path_factory.mktemp("onnx")
    for name, flags in (("cam.onnx", ["--cam"]), ("plain.onnx", [])):
        assert main(["export", str(tiny_run), "--out", str(root / name), *flags]) == 0
    return root / "cam.onnx", root / "plain.onnx"


@pytest.mark.slow
def test_an_onnx_file_is_served_like_its_run(onnx_files, backend, files):
    with_maps, plain = (load_backend(p, ServeConfig()) for p in onnx_files)
    body = files[3].read_bytes()

    async def go(b):
        async with serving(b) as (_, client):
            return (await client.post("/v1/predict", content=body, headers={"content-type": "image/jpeg"}),
                    await client.post("/v1/cam?format=json", content=body, headers=PNG), await client.get("/v1/model"))

    torch_answer, torch_maps, torch_card = run(go(backend))
    for b, cam in ((with_maps, True), (plain, False)):
        answer, maps, card = run(go(b))
        assert_same_top(top_of(answer.json()["predictions"][0]), top_of(torch_answer.json()["predictions"][0]), 1e-4)
        assert card.json() == {**torch_card.json(), "runtime": "onnxruntime", "cam": cam,
                               "version": hashlib.sha256(b.path.read_bytes()).hexdigest()[:12]}
        if cam:
            got, want = maps.json()["top"][0]["map"], torch_maps.json()["top"][0]["map"]
            np.testing.assert_allclose(got, want, atol=1e-3)
        else:
            assert maps.status_code == 409 and "--cam" in maps.json()["error"]


@pytest.mark.slow
def test_an_onnx_file_is_served_without_torch(onnx_files, files, tmp_path):
    """torch cannot be imported in the server process (None in sys.modules): it answers all the same."""
    body = files[0].read_bytes()
    errors = open(tmp_path / "stderr", "w")
    with server(onnx_files[0], prelude="import sys; sys.modules['torch'] = None; ", stderr=errors) as (proc, url):
        with httpx.Client(base_url=url, timeout=60) as client:
            predicted = client.post("/v1/predict", content=body, headers=PNG)
            cam = client.post("/v1/cam", content=body, headers=PNG)
            card = client.get("/v1/model").json()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    errors.close()
    assert predicted.status_code == 200, (tmp_path / "stderr").read_text()
    assert predicted.json()["predictions"][0]["top"][0]["class"] in card["classes"]
    assert cam.status_code == 200 and cam.headers["content-type"] == "image/png"
    assert card["runtime"] == "onnxruntime" and card["dataset"] == "fashion-mnist"


def test_only_a_small_image_is_decoded_on_the_event_loop():
    """One image of at most INLINE_PIXELS pixels (by its header) is decoded on the event loop; anything larger,
    or anything that is not an image, goes to a thread, where it cannot hold up other requests."""
    from nin.serve.app import INLINE_PIXELS
    from nin.serve.images import small

    assert small(png(np.zeros((28, 28), np.uint8)), INLINE_PIXELS)
    assert not small(png(np.zeros((200, 200), np.uint8)), INLINE_PIXELS)
    assert not small(png_header(100_000, 100_000), INLINE_PIXELS)  # a bomb's header is read, never its pixels
    assert not small(b"not an image", INLINE_PIXELS) and not small(b"", INLINE_PIXELS)
    # a PNG's size is read from its IHDR bytes, other formats' by Pillow: the same answers
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(jpeg, format="JPEG")
    assert small(jpeg.getvalue(), INLINE_PIXELS) and not small(jpeg.getvalue(), 28 * 28 - 1)
    assert small(png(np.zeros((10, 20), np.uint8)), 200) and not small(png(np.zeros((10, 20), np.uint8)), 199)
    assert not small(png(np.zeros((28, 28), np.uint8))[:20], INLINE_PIXELS)  # cut inside its header: the long way


def test_a_request_image_is_never_a_path(tmp_path):
    """A body that names a file is bytes to decode, nothing more."""
    target = tmp_path / "secret.png"
    target.write_bytes(png(np.zeros((28, 28), np.uint8)))
    with pytest.raises(BadImage, match="cannot identify image file"):
        decode_request_image(str(target).encode(), "body", 1, (28, 28), 10**6)
