// The page of `nin serve`: the model card, files or a drawing classified through the HTTP API, each result with
// its top classes as bars and its class activation map. Plain browser JavaScript, nothing fetched from elsewhere.
// Every failure (the network, an HTTP error with the server's {"error": ...} reason) ends up in #error.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const TIMEOUT_MS = 60000; // a request with no answer by then is reported, not left spinning
  const PARALLEL = 4; // files in flight at once; the server batches them
  const MAX_ROWS = 100; // older results are dropped (and their object URLs released)
  const SCALE = 10; // the drawing canvas holds SCALE x SCALE pixels per model input pixel

  const state = {
    card: null, // GET /v1/model, once loaded
    key: "", // the API key, sent as a bearer token once given
    waitingForKey: [], // what failed with a 401, tried again when a key is given
    drawSeq: 0, // the latest drawing sent: older answers are dropped
    drawRow: null,
  };

  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  // ------------------------------------------------------------------------------------------- errors

  const errorBox = $("error");
  const errorList = $("error-list");

  function showError(message) {
    errorList.append(el("li", "", message));
    errorBox.hidden = false;
  }

  function clearErrors() {
    errorList.replaceChildren();
    errorBox.hidden = true;
  }

  $("error-close").addEventListener("click", clearErrors);

  // --------------------------------------------------------------------------------------------- HTTP

  class RequestError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status; // 0: no HTTP answer at all
    }
  }

  // The server's one-line reason: the "error" field of its JSON body, else a short plain-text body, else the
  // status line.
  async function reasonOf(res) {
    let text = "";
    try {
      text = await res.text();
    } catch (e) {
      return res.statusText || "no reason given";
    }
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === "string" && body.error) return body.error;
      if (body && typeof body.detail === "string" && body.detail) return body.detail;
    } catch (e) {
      // not JSON: a proxy's page, a plain-text message
    }
    text = text.trim();
    if (text && text.length <= 300 && !text.startsWith("<")) return text;
    return res.statusText || "no reason given";
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
    let res;
    try {
      res = await fetch(path, { ...options, headers, cache: "no-store", signal: abort.signal });
    } catch (e) {
      const why = abort.signal.aborted ? `no answer within ${TIMEOUT_MS / 1000} s` : "the server could not be reached";
      throw new RequestError(0, `network error: ${why} (${e.message || e})`);
    } finally {
      clearTimeout(timer);
    }
    if (!res.ok) {
      const reason = await reasonOf(res);
      const line = `${res.status}${res.statusText ? " " + res.statusText : ""}`;
      throw new RequestError(res.status, `${line}: ${reason}`);
    }
    return res;
  }

  // Report a failure in #error; a 401 also asks for the key and keeps `retry` for when it is given.
  function report(error, what, retry) {
    const message = error instanceof RequestError ? error.message : `unexpected failure: ${error.message || error}`;
    if (error instanceof RequestError && error.status === 401) {
      showError(`${what}: ${message}. Enter the API key and choose "Use key".`);
      if (retry) state.waitingForKey.push(retry);
      keyForm.classList.add("needs-key");
      const active = document.activeElement;
      if (!active || !["INPUT", "TEXTAREA", "SELECT"].includes(active.tagName)) keyInput.focus();
    } else {
      showError(`${what}: ${message}`);
    }
    return message;
  }

  // ------------------------------------------------------------------------------------------ API key

  const keyForm = $("key-form");
  const keyInput = $("api-key");

  keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = keyInput.value.trim();
    keyForm.classList.remove("needs-key");
    clearErrors();
    const retries = state.waitingForKey.splice(0);
    if (!state.card && !retries.includes(loadCard)) retries.unshift(loadCard);
    for (const retry of retries) retry();
  });

  // ------------------------------------------------------------------------------------- model card

  const cardBox = $("model-card");
  const topKInput = $("top-k");

  const percent = (x) => `${(100 * x).toFixed(2)}%`;

  function cardRows(c) {
    const input = c.input || {};
    const batching = c.batching || {};
    const classes = Array.isArray(c.classes) ? c.classes : [];
    return [
      ["Model", c.name],
      ["Version", c.version],
      ["Parameters", Number.isFinite(c.parameters) ? c.parameters.toLocaleString("en-US") : null],
      ["Data set", c.dataset],
      ["Classes", classes.length ? `${classes.length}: ${classes.join(", ")}` : null],
      ["Input", input.channels ? `${input.channels} × ${input.height} × ${input.width}` +
        ` (${input.channels === 1 ? "grey" : input.channels === 3 ? "colour" : "channels"})` : null],
      ["Test accuracy", typeof c.test_accuracy === "number"
        ? percent(c.test_accuracy) + (c.test_accuracy_tta ? " (with flip TTA)" : "") : "unknown"],
      ["Trained", c.trained || "unknown"],
      ["Runtime", c.runtime],
      ["Class maps", c.cam === undefined ? null : c.cam ? "yes" : "no (this model has none)"],
      ["Batching", batching.enabled === undefined ? null : batching.enabled
        ? `on, up to ${batching.max_batch} images or ${batching.max_delay_ms} ms` : "off"],
    ];
  }

  function renderCard(c) {
    const dl = el("dl", "card");
    for (const [term, value] of cardRows(c)) {
      if (value === null || value === undefined || value === "") continue;
      const row = el("div", "card-row");
      row.append(el("dt", "", term), el("dd", "", String(value)));
      row.dataset.field = term.toLowerCase().replace(/\s+/g, "-");
      dl.append(row);
    }
    cardBox.replaceChildren(dl);
  }

  async function loadCard() {
    cardBox.setAttribute("aria-busy", "true");
    try {
      const res = await api("v1/model");
      const c = await res.json();
      state.card = c;
      renderCard(c);
      if (Array.isArray(c.classes) && c.classes.length) {
        topKInput.max = String(c.classes.length);
        if (Number(topKInput.value) > c.classes.length) topKInput.value = String(c.classes.length);
      }
      setUpCanvas(c);
    } catch (error) {
      const message = report(error, "model card", loadCard);
      const p = el("p", "muted", `The model card could not be loaded (${message}). `);
      const again = el("button", "link", "Try again");
      again.type = "button";
      again.addEventListener("click", () => { clearErrors(); loadCard(); });
      p.append(again);
      cardBox.replaceChildren(p);
    } finally {
      cardBox.setAttribute("aria-busy", "false");
    }
  }

  function topK() {
    const k = Math.round(Number(topKInput.value));
    const most = state.card && Array.isArray(state.card.classes) ? state.card.classes.length : 100;
    return Number.isFinite(k) && k >= 1 ? Math.min(k, most) : 5;
  }

  // ------------------------------------------------------------------------------------------ results

  const results = $("results");
  const statusLine = $("status");

  // The ids the tests use (#bars, #cam-image) belong to the newest result, the first row.
  function moveIds() {
    for (const e of results.querySelectorAll("#bars, #cam-image")) e.removeAttribute("id");
    const first = results.firstElementChild;
    if (!first) return;
    first.querySelector(".bars").id = "bars";
    first.querySelector(".cam-image").id = "cam-image";
  }

  function release(row) {
    for (const img of row.querySelectorAll("img")) if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  }

  function setImage(img, blob) {
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
  }

  function makeRow(name) {
    const row = el("article", "result");
    row.setAttribute("aria-label", `Result for ${name}`);

    const input = el("figure", "thumb");
    const img = el("img", "input-image");
    img.alt = `${name} (the image sent)`;
    img.addEventListener("error", () => { img.hidden = true; input.classList.add("no-preview"); });
    input.append(img, el("figcaption", "name", name));

    const pred = el("div", "pred");
    const bars = el("ol", "bars");
    bars.setAttribute("aria-label", `Most likely classes for ${name}`);
    pred.append(bars, el("p", "row-status muted", "classifying…"));

    const cam = el("figure", "cam");
    const camImg = el("img", "cam-image");
    camImg.alt = `Class activation map of the most likely class for ${name}`;
    camImg.hidden = true;
    cam.append(camImg, el("figcaption", "cam-caption muted", ""));

    row.append(input, pred, cam);
    return row;
  }

  function addRows(rows) {
    results.prepend(...rows);
    while (results.children.length > MAX_ROWS) {
      const last = results.lastElementChild;
      release(last);
      last.remove();
    }
    moveIds();
  }

  function renderBars(row, top) {
    const items = top.map((t) => {
      const li = el("li", "bar");
      li.dataset.class = t.class;
      const p = Math.max(0, Math.min(1, Number(t.probability) || 0));
      const shown = p > 0 && p < 0.001 ? "<0.1%" : `${(100 * p).toFixed(1)}%`;
      const track = el("span", "track");
      track.setAttribute("aria-hidden", "true");
      const fill = el("span", "fill");
      fill.style.width = `${(100 * p).toFixed(2)}%`;
      track.append(fill);
      li.append(el("span", "label", t.class), track, el("span", "value", shown));
      li.title = `${t.class}: ${(100 * p).toFixed(3)}%`;
      return li;
    });
    row.querySelector(".bars").replaceChildren(...items);
  }

  function rowFailed(row, message) {
    row.classList.add("failed");
    const s = row.querySelector(".row-status");
    s.textContent = message;
    s.className = "row-status row-error";
  }

  // POST one image to /v1/predict and /v1/cam (at the same time); fill its row. Resolves once both are done.
  async function classify(blob, name, row, isCurrent = () => true) {
    const form = () => {
      const f = new FormData();
      f.append("file", blob, name);
      return f;
    };
    row.classList.remove("failed");
    const status = row.querySelector(".row-status");
    status.className = "row-status muted";
    status.textContent = "classifying…";
    const retry = () => classify(blob, name, row, isCurrent);
    const started = performance.now();

    const predicting = (async () => {
      try {
        const res = await api(`v1/predict?top_k=${topK()}`, { method: "POST", body: form() });
        const doc = await res.json();
        const pred = doc.predictions && doc.predictions[0];
        if (!pred || !Array.isArray(pred.top)) throw new Error("the server's answer holds no prediction");
        if (!isCurrent()) return;
        renderBars(row, pred.top);
        status.textContent = `${Math.round(performance.now() - started)} ms` +
          (doc.version ? ` · ${doc.model || "model"} ${doc.version}` : "");
      } catch (error) {
        if (!isCurrent()) return;
        rowFailed(row, report(error, name, retry));
        throw error;
      }
    })();

    const camImg = row.querySelector(".cam-image");
    const camCaption = row.querySelector(".cam-caption");
    const mapping = (async () => {
      if (state.card && state.card.cam === false) {
        camCaption.textContent = "This model has no class maps.";
        return;
      }
      try {
        const res = await api("v1/cam?format=png", { method: "POST", body: form() });
        const png = await res.blob();
        if (!isCurrent()) return;
        setImage(camImg, png);
        camImg.hidden = false;
        camCaption.textContent = "Where the model saw the most likely class";
      } catch (error) {
        if (!isCurrent()) return;
        camImg.hidden = true;
        camCaption.textContent = "";
        // A failed prediction has reported the cause (the same image, the same server); a 401 is retried with
        // the key, both requests again.
        const predicted = await predicting.then(() => true, () => false);
        if (predicted && isCurrent()) {
          camCaption.textContent = "No class map.";
          report(error, `${name} (class map)`);
        }
      }
    })();

    const outcome = await Promise.allSettled([predicting, mapping]);
    return outcome[0].status === "fulfilled";
  }

  async function handleFiles(files) {
    if (!files.length) return;
    clearErrors();
    const jobs = files.map((file) => {
      const row = makeRow(file.name || "image");
      setImage(row.querySelector(".input-image"), file);
      return { file, row };
    });
    addRows(jobs.map((j) => j.row));
    const n = files.length;
    statusLine.textContent = `Classifying ${n} image${n === 1 ? "" : "s"}…`;
    const started = performance.now();
    let next = 0;
    let good = 0;
    const worker = async () => {
      while (next < jobs.length) {
        const { file, row } = jobs[next++];
        if (await classify(file, file.name || "image", row)) good += 1;
      }
    };
    await Promise.all(Array.from({ length: Math.min(PARALLEL, jobs.length) }, worker));
    const ms = Math.round(performance.now() - started);
    statusLine.textContent = `${good} of ${n} image${n === 1 ? "" : "s"} classified in ${ms} ms.`;
  }

  // ------------------------------------------------------------------------------ files: choose, drop, paste

  const fileInput = $("file-input");
  const dropZone = $("drop-zone");

  fileInput.addEventListener("change", () => {
    const files = Array.from(fileInput.files || []);
    fileInput.value = ""; // the same file can be chosen again
    handleFiles(files);
  });

  // A drop anywhere on the page is taken (the browser would otherwise leave the page to show the file).
  let dragDepth = 0;
  window.addEventListener("dragenter", (e) => {
    if (!e.dataTransfer || !Array.from(e.dataTransfer.types).includes("Files")) return;
    e.preventDefault();
    dragDepth += 1;
    dropZone.classList.add("over");
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) dropZone.classList.remove("over");
  });
  window.addEventListener("dragover", (e) => {
    e.preventDefault();
    if (e.dataTransfer) e.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    dragDepth = 0;
    dropZone.classList.remove("over");
    handleFiles(Array.from((e.dataTransfer && e.dataTransfer.files) || []));
  });

  document.addEventListener("paste", (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []);
    if (files.length) {
      e.preventDefault();
      handleFiles(files);
    }
  });

  // ------------------------------------------------------------------------------------------- drawing

  const canvas = $("canvas");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const brush = $("brush");
  let drawing = false;
  let last = null;

  function blank() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  }

  // Only 1-channel 28 x 28 models (Fashion-MNIST, MNIST, ...) get the canvas.
  function setUpCanvas(c) {
    const input = c.input || {};
    const drawable = input.channels === 1 && input.height === 28 && input.width === 28;
    $("draw-panel").hidden = !drawable;
    if (!drawable) return;
    canvas.width = SCALE * input.width;
    canvas.height = SCALE * input.height;
    blank();
  }

  function at(e) {
    const r = canvas.getBoundingClientRect();
    return { x: ((e.clientX - r.left) * canvas.width) / r.width, y: ((e.clientY - r.top) * canvas.height) / r.height };
  }

  function stroke(from, to) {
    ctx.strokeStyle = "#fff";
    ctx.fillStyle = "#fff";
    ctx.lineWidth = Number(brush.value);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    if (from.x === to.x && from.y === to.y) {
      ctx.arc(to.x, to.y, ctx.lineWidth / 2, 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x, to.y);
      ctx.stroke();
    }
  }

  canvas.addEventListener("pointerdown", (e) => {
    if (e.pointerType === "mouse" && e.button !== 0) return;
    e.preventDefault();
    canvas.setPointerCapture(e.pointerId);
    drawing = true;
    last = at(e);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const points = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
    for (const p of points.length ? points : [e]) {
      const next = at(p);
      stroke(last, next);
      last = next;
    }
  });
  const lift = () => {
    if (!drawing) return;
    drawing = false;
    classifyDrawing();
  };
  canvas.addEventListener("pointerup", lift);
  canvas.addEventListener("pointercancel", lift);

  $("clear").addEventListener("click", blank);

  // The drawing at the model's input size: each block of SCALE x SCALE canvas pixels averaged into one pixel
  // (exact area averaging, not the browser's resampling), as a grey PNG.
  function drawingAsPng() {
    const w = canvas.width / SCALE;
    const h = canvas.height / SCALE;
    const src = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const small = document.createElement("canvas");
    small.width = w;
    small.height = h;
    const sctx = small.getContext("2d");
    const out = sctx.createImageData(w, h);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        let sum = 0;
        for (let dy = 0; dy < SCALE; dy++) {
          let i = ((y * SCALE + dy) * canvas.width + x * SCALE) * 4;
          for (let dx = 0; dx < SCALE; dx++, i += 4) sum += src[i];
        }
        const v = Math.round(sum / (SCALE * SCALE));
        const o = (y * w + x) * 4;
        out.data[o] = out.data[o + 1] = out.data[o + 2] = v;
        out.data[o + 3] = 255;
      }
    }
    sctx.putImageData(out, 0, 0);
    return new Promise((resolve, reject) =>
      small.toBlob((b) => (b ? resolve(b) : reject(new Error("the drawing could not be encoded"))), "image/png"));
  }

  async function classifyDrawing() {
    const seq = ++state.drawSeq;
    clearErrors();
    let png;
    try {
      png = await drawingAsPng();
    } catch (error) {
      report(error, "drawing");
      return;
    }
    if (seq !== state.drawSeq) return;
    if (!state.drawRow || !state.drawRow.isConnected) {
      state.drawRow = makeRow("drawing.png");
      state.drawRow.classList.add("drawing");
    }
    setImage(state.drawRow.querySelector(".input-image"), png);
    state.drawRow.querySelector(".input-image").hidden = false;
    addRows([state.drawRow]); // (moved) to the top
    statusLine.textContent = "Classifying the drawing…";
    const ok = await classify(png, "drawing.png", state.drawRow, () => seq === state.drawSeq);
    if (seq === state.drawSeq) statusLine.textContent = ok ? "Drawing classified." : "The drawing was not classified.";
  }

  // ------------------------------------------------------------------------------------------- start

  blank();
  loadCard();
})();
