"""nin serve's web page in a real browser: Debian's Chromium, headless, driven by Playwright, against a real
``nin serve`` process on a loopback port serving a briefly trained nin28 (real Fashion-MNIST).

Skipped when Playwright, httpx or /usr/bin/chromium is missing (``bash scripts/install.sh --test`` installs them);
in CI (``CI`` set) their absence is a failure. ``NIN_SCREENSHOT=docs/serve.png`` makes the upload test save a
full-page screenshot there (the README's picture), and ``NIN_SERVE_RUN=RUN`` shows that run instead of the tiny one:

    NIN_SCREENSHOT=docs/serve.png NIN_SERVE_RUN=runs/demo python3 -m pytest tests/test_serve_page.py -k upload
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
START_S = 180  # nin serve loads torch and the model on a busy machine
WAIT_MS = 60_000  # a prediction or a class map (matplotlib) on a busy machine
KEY = "a-test-key-7f3b"


def _missing() -> str:
    why = [f"{name} is not installed (pip install -e '.[test]')" for name in ("playwright", "httpx")
           if importlib.util.find_spec(name) is None]
    if not os.access(CHROMIUM, os.X_OK):
        why.append(f"{CHROMIUM} is missing (bash scripts/install.sh --test installs Debian's chromium)")
    return "; ".join(why)


MISSING = _missing()
if MISSING and not os.environ.get("CI"):
    pytest.skip(f"browser tests: {MISSING}", allow_module_level=True)

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(run: Path, *flags: str):
    """``nin serve RUN --port PORT FLAGS`` in its own process; yields its base URL once it prints its listening
    line; terminated (then killed) on the way out."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NIN_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "nin", "serve", str(run), "--host", "127.0.0.1",
                             "--port", str(port), *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    seen: list[str] = []
    lines: queue.Queue = queue.Queue()

    def read() -> None:  # drains the pipe for the whole life of the process
        for line in proc.stdout:
            seen.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + START_S
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"nin serve printed no listening line within {START_S} s:\n{''.join(seen)}")
            if line is None:
                pytest.fail(f"nin serve exited ({proc.wait(10)}) before listening:\n{''.join(seen)}")
            found = re.match(r"nin serve: .* on (http://\S+/) ", line)
            if found:
                url = found.group(1)
                assert url == f"http://127.0.0.1:{port}/", line
                break
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def served(request) -> Path:
    """The run the page is shown: the session's tiny run, or ``NIN_SERVE_RUN`` (a better-trained run, for the
    README's picture)."""
    chosen = os.environ.get("NIN_SERVE_RUN")
    return Path(chosen) if chosen else request.getfixturevalue("tiny_run")


@pytest.fixture(scope="module")
def server(served):
    with serving(served) as url:
        yield url


@pytest.fixture(scope="module")
def card(server) -> dict:
    import httpx

    r = httpx.get(server + "v1/model", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if MISSING:  # only in CI: elsewhere the module is skipped
        pytest.fail(f"the browser tests are required in CI: {MISSING}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1200, "height": 900}, timeout=60_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser):
    """A fresh tab; any uncaught JavaScript exception in it fails the test."""
    tab = browser.new_page()
    tab.set_default_timeout(WAIT_MS)
    crashes: list[str] = []
    tab.on("pageerror", lambda e: crashes.append(str(e)))
    try:
        yield tab
    finally:
        tab.close()
    assert not crashes, crashes


def open_page(page, url: str, card: dict | None = None) -> None:
    from playwright.sync_api import expect

    page.goto(url, timeout=WAIT_MS)
    if card is not None:  # wait for the model card: the page knows the model's input
        expect(page.locator("#model-card")).to_contain_text(card["name"], timeout=WAIT_MS)


def top_bar(page):
    return page.locator("#bars .bar").first


# ---------------------------------------------------------------------------------------------- the images


@pytest.fixture(scope="module")
def sure_images(served, tmp_path_factory) -> list[tuple[Path, str, float]]:
    """Up to three Fashion-MNIST test images (PNG files), of different classes where it can, that the tiny model
    classifies right with a clear lead over its second guess, each with its class and the probability
    ``nin predict`` gives it; the surest first."""
    from PIL import Image

    from nin.data.sources import load_split
    from nin.inference.predict import predict_files
    from nin.inference.trained import load_trained

    x, y = load_split("fashion-mnist", "test")
    folder = tmp_path_factory.mktemp("fashion-pngs")
    paths = []
    for i in range(256):
        paths.append(folder / f"test-{i:03d}.png")
        Image.fromarray(x[i][0].numpy()).save(paths[-1])
    trained = load_trained(served, "cpu")
    preds, bad = predict_files(trained, paths, top_k=2)
    assert not bad and len(preds) == len(paths)
    right = sorted(((Path(p.file), p.top[0][0], p.top[0][1]) for p, label in zip(preds, y[: len(paths)].tolist())
                    if p.top[0][0] == trained.classes[label] and p.top[0][1] - p.top[1][1] > 0.1),
                   key=lambda r: -r[2])
    if not right:
        pytest.fail("the tiny model classified none of 256 test images right with a clear lead")
    chosen, classes = [], set()
    for r in right:  # one per class first
        if r[1] not in classes:
            chosen.append(r)
            classes.add(r[1])
    chosen += [r for r in right if r not in chosen]
    return chosen[:3]


# --------------------------------------------------------------------------------------------------- tests


def test_upload_shows_the_models_class_and_its_map(server, card, page, sure_images):
    from playwright.sync_api import expect

    open_page(page, server, card)
    shown = page.locator("#model-card")
    for value in (card["name"], card["version"], f"{card['parameters']:,}", card["classes"][0]):
        expect(shown).to_contain_text(str(value))

    page.set_input_files("#file-input", [str(path) for path, _, _ in sure_images])
    rows = page.locator("#results .result")
    expect(rows).to_have_count(len(sure_images))
    for row, (path, name, p) in zip(rows.all(), sure_images):  # one row per file, in order
        expect(row).to_contain_text(path.name)
        expect(row.locator(".bar").first).to_have_attribute("data-class", name, timeout=WAIT_MS)
        expect(row.locator(".bar")).to_have_count(5)
        percent = row.locator(".bar .value").first.inner_text()
        assert float(percent.rstrip("%")) == pytest.approx(100 * p, abs=0.06), (percent, p)

    path, name, _ = sure_images[0]
    expect(top_bar(page)).to_have_attribute("data-class", name)  # #bars: the first file's
    page.wait_for_function("() => [...document.querySelectorAll('#results .cam-image')].every("
                           "i => i.complete && i.naturalWidth > 0)", timeout=WAIT_MS)
    assert page.eval_on_selector("#cam-image", "i => i.naturalWidth") > 0
    expect(page.locator("#error")).to_be_hidden()

    if os.environ.get("NIN_SCREENSHOT"):
        page.evaluate("document.activeElement && document.activeElement.blur()")
        page.screenshot(path=os.environ["NIN_SCREENSHOT"], full_page=True)


def test_a_dropped_file_is_classified(server, card, page, sure_images):
    from playwright.sync_api import expect

    path, name, _ = sure_images[0]
    open_page(page, server, card)
    drop = page.evaluate_handle("([bytes, name]) => { const t = new DataTransfer(); t.items.add("
                                "new File([new Uint8Array(bytes)], name, {type: 'image/png'})); return t; }",
                                [list(path.read_bytes()), path.name])
    for kind in ("dragenter", "dragover", "drop"):
        page.dispatch_event("#drop-zone", kind, {"dataTransfer": drop})
    expect(page.locator("#results .result")).to_have_count(1)
    expect(top_bar(page)).to_have_attribute("data-class", name, timeout=WAIT_MS)
    expect(page.locator("#error")).to_be_hidden()


def test_a_drawing_is_classified_when_the_mouse_is_released(server, card, page):
    import httpx
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    open_page(page, server, card)
    canvas = page.locator("#canvas")
    expect(canvas).to_be_visible()
    expect(page.locator("#bars .bar")).to_have_count(0)
    box = canvas.bounding_box()

    def to(fx: float, fy: float) -> tuple[float, float]:
        return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

    # one stroke, a pair of trousers: up a leg, along the waistband, down the other leg
    page.mouse.move(*to(0.3, 0.9))
    page.mouse.down()
    for fx, fy in ((0.32, 0.15), (0.68, 0.15), (0.7, 0.9)):
        page.mouse.move(*to(fx, fy), steps=10)
    page.mouse.up()

    bars = page.locator("#bars .bar")
    expect(bars).to_have_count(5, timeout=WAIT_MS)
    expect(page.locator("#error")).to_be_hidden()
    shown = bars.evaluate_all("bs => bs.map(b => [b.dataset.class, b.querySelector('.value').textContent])")

    # what the page sent (its row shows the very blob it posted): the canvas at the model's input size, white
    # on black; the server's answer for those bytes is what the bars show
    sent = bytes(page.evaluate("async () => [...new Uint8Array(await (await fetch("
                               "document.querySelector('#results .result .input-image').src)).arrayBuffer())]"))
    drawn = Image.open(io.BytesIO(sent))
    assert drawn.format == "PNG" and drawn.size == (card["input"]["width"], card["input"]["height"])
    pixels = np.asarray(drawn.convert("L"))
    assert pixels.min() == 0 and pixels.max() > 200 and 20 < (pixels > 127).sum() < 0.6 * pixels.size
    r = httpx.post(server + "v1/predict", files={"file": ("drawing.png", sent, "image/png")}, timeout=30)
    assert r.status_code == 200, r.text
    top = r.json()["predictions"][0]["top"]
    assert [c for c, _ in shown] == [t["class"] for t in top]
    for (_, value), t in zip(shown, top):
        assert value == "<0.1%" and t["probability"] < 0.001 or \
            float(value.rstrip("%")) == pytest.approx(100 * t["probability"], abs=0.06), (value, t)

    page.click("#clear")
    assert page.eval_on_selector("#canvas", "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, "
                                 "c.height).data; return d.some((v, i) => i % 4 < 3 && v > 0); }") is False


def test_an_error_is_shown_with_the_servers_reason(server, card, page, tmp_path):
    import httpx
    from playwright.sync_api import expect

    fake = tmp_path / "notes.png"
    fake.write_text("These are notes, not a picture.\n")
    r = httpx.post(server + "v1/predict", files={"file": (fake.name, fake.read_bytes(), "image/png")}, timeout=30)
    assert r.status_code == 400, r.text
    reason = r.json()["error"]

    open_page(page, server, card)
    page.set_input_files("#file-input", str(fake))
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=WAIT_MS)
    expect(error).to_contain_text(reason)
    expect(error).to_contain_text("400")
    expect(page.locator("#results .result.failed")).to_contain_text(reason)
    expect(page.locator("#bars .bar")).to_have_count(0)
    expect(page.locator("#model-card")).to_contain_text(card["name"])  # the page is still there

    page.click("#error-close")
    expect(error).to_be_hidden()


def test_a_network_failure_is_shown(server, card, page, sure_images):
    from playwright.sync_api import expect

    open_page(page, server, card)
    page.route("**/v1/predict*", lambda route: route.abort("connectionrefused"))
    page.set_input_files("#file-input", str(sure_images[0][0]))
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=WAIT_MS)
    expect(error).to_contain_text("network error")
    expect(page.locator("#bars .bar")).to_have_count(0)


def test_the_api_key_is_asked_for_and_then_used(served, page, sure_images):
    import httpx
    from playwright.sync_api import expect

    path, name, _ = sure_images[0]
    with serving(served, "--api-key", KEY) as url:
        r = httpx.get(url + "v1/model", timeout=30)
        assert r.status_code == 401, r.text
        reason = r.json()["error"]

        open_page(page, url)
        error = page.locator("#error")
        expect(error).to_contain_text(reason, timeout=WAIT_MS)
        expect(error).to_contain_text("401")
        expect(page.locator("#api-key")).to_be_focused()
        page.set_input_files("#file-input", str(path))  # refused too, and kept for when the key comes
        expect(page.locator("#results .result.failed")).to_contain_text("401", timeout=WAIT_MS)

        page.fill("#api-key", "not-the-key")
        page.press("#api-key", "Enter")
        expect(error).to_contain_text("401", timeout=WAIT_MS)

        page.fill("#api-key", KEY)
        page.press("#api-key", "Enter")  # the keyboard submits the key
        card = httpx.get(url + "v1/model", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
        expect(page.locator("#model-card")).to_contain_text(card["version"], timeout=WAIT_MS)
        expect(top_bar(page)).to_have_attribute("data-class", name, timeout=WAIT_MS)  # the refused file, again
        expect(error).to_be_hidden()

        path, name, _ = sure_images[-1]
        page.set_input_files("#file-input", str(path))
        expect(page.locator("#results .result")).to_have_count(2)
        expect(top_bar(page)).to_have_attribute("data-class", name, timeout=WAIT_MS)  # the new row's
        expect(error).to_be_hidden()
