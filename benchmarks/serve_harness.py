"""What benchmarks/serve_load.py and benchmarks/serve_soak.py share: a real ``nin serve`` process, a light HTTP
client in a process of its own, the test images as request bodies, and the process's memory and CPU time.

* :class:`Server`: ``nin serve TARGET --host 127.0.0.1 --port 0 FLAGS`` started as a child process, waited for
  (its "nin serve: ... on http://127.0.0.1:PORT/" line, with a timeout), stopped with SIGTERM (then killed if it
  does not exit) when the ``with`` block ends, whatever happened in it.
* :func:`run_client`: runs THIS file as a separate Python process (``python serve_harness.py client JOB OUT``)
  that imports only the standard library: asyncio streams, one keep-alive HTTP/1.1 connection per client,
  requests prebuilt as bytes, so the client costs the shared CPUs as little as possible. It sends the requests
  of a job (a pickle) in order from ``clients`` connections at once, until all are sent or ``seconds`` have
  passed, and writes each answer's status, latency and (if asked) body to OUT.
* :func:`raw_request`, :func:`multipart`: a POST as the bytes sent on the wire.
* :func:`test_images`: real test images of a run's data set, decoded by nin's data loaders (nin.data), as
  PNG or JPEG files (Pillow).

Nothing here imports torch or numpy at module level: the client process must start fast and stay small.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
LISTENING = re.compile(r"^nin serve: (\S+) on http://127\.0\.0\.1:(\d+)/")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------- the server


class Server:
    """A ``nin serve`` child process on a free loopback port; ``with Server(...) as s:`` -> ``s.port``, ``s.pid``."""

    def __init__(self, target: str | os.PathLike, *flags: str, start_timeout: float = 180.0,
                 stop_timeout: float = 30.0) -> None:
        self.argv = [sys.executable, "-m", "nin", "serve", str(target), "--host", HOST, "--port", "0", *flags]
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.model = ""
        self.exit_code: int | None = None
        self._stderr = tempfile.TemporaryFile()
        self._line = threading.Event()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        try:
            threading.Thread(target=self._read_stdout, daemon=True).start()
            if not self._line.wait(self.start_timeout) or not self.port:
                raise RuntimeError(f"nin serve did not say it listens within {self.start_timeout:g} s "
                                   f"(exit {self.proc.poll()}): {self.stderr()[-2000:]}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:  # the listening line, then whatever else it prints, until it exits
            m = LISTENING.match(line)
            if m and not self.port:
                self.model, self.port = m.group(1), int(m.group(2))
                self._line.set()
        self._line.set()  # it exited before listening: no need to wait longer

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``stop_timeout``; its exit code."""
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(self.stop_timeout)
        self.exit_code = self.proc.returncode
        return self.exit_code

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def status(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the server process, in bytes, from /proc/PID/status."""
        return proc_memory(self.pid)

    def cpu_seconds(self, main_thread: bool = False) -> float:
        """CPU time of the server so far: all its threads, or its main thread (the event loop) only."""
        return proc_cpu_seconds(self.pid, self.pid if main_thread else None)

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        """One GET request on a fresh connection (for /metrics, /v1/model): status and body."""
        import http.client

        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            conn.close()


def proc_memory(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def proc_cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time so far of a process (its threads included), or of one of its threads (``thread``: its
    id; the process's id is its main thread, where uvicorn's event loop runs)."""
    with open(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of stat(5))


def metric_sums(text: str, *names: str) -> dict[str, float]:
    """The values of the unlabelled Prometheus samples ``names`` (e.g. ``nin_batch_images_sum``) in ``text``."""
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in out:
            out[name] = float(value)
    return out


# ------------------------------------------------------------------------------------------ the requests


def raw_request(path: str, body: bytes, content_type: str | None, *, headers: tuple[str, ...] = (),
                chunked: bool = False) -> bytes:
    """A keep-alive HTTP/1.1 POST as bytes: with ``Content-Length``, or ``chunked`` (no length declared)."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        step = 16384
        body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step])
                        for i in range(0, len(body), step)) + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode() + body


def multipart(files: list[tuple[str, bytes, str]], boundary: str = "nin-soak-boundary-7d1f") -> tuple[bytes, str]:
    """A ``multipart/form-data`` body of ``(file name, bytes, content type)`` parts, and its content type."""
    out = []
    for i, (name, data, kind) in enumerate(files):
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file{i}"; filename="{name}"\r\n'
                   f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def test_images(run: str | os.PathLike, count: int, offset: int = 0):
    """``count`` real test images of ``run``'s data set (uint8 ``[N, C, H, W]`` numpy), decoded by nin.data."""
    from nin.inference.trained import load_trained

    split = load_trained(run, "cpu").test_split()  # nin.data.load_splits with the run's own data settings
    return split.images[offset:offset + count].numpy()


def encode(image, fmt: str = "PNG") -> bytes:
    """uint8 ``[C, H, W]`` as a PNG or JPEG file's bytes (Pillow)."""
    import io

    from PIL import Image

    hwc = image.transpose(1, 2, 0)
    picture = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    buf = io.BytesIO()
    picture.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# -------------------------------------------------------------------------------------------- the client


def run_client(port: int, requests: list[bytes], order: list[int], *, clients: int, seconds: float,
               bodies: bool = False, timeout: float = 60.0) -> dict:
    """Send ``requests[i]`` for each ``i`` in ``order`` from ``clients`` connections at once, in a separate process,
    until all are answered or ``seconds`` have passed (``timeout``: the most one answer may take). Returns
    ``{"elapsed", "cpu" (the client's CPU seconds), "answers": [(i, status, seconds, body or None), ...]}`` in the
    order the answers came; status 0: no answer (the body says why)."""
    job = {"port": port, "requests": requests, "order": list(order), "clients": clients, "seconds": seconds,
           "bodies": bodies, "timeout": timeout}
    with tempfile.TemporaryDirectory(prefix="nin-client-") as tmp:
        job_file, out_file = Path(tmp) / "job.pickle", Path(tmp) / "out.pickle"
        job_file.write_bytes(pickle.dumps(job))
        limit = 2 * seconds + timeout + 60  # the client stops itself at `seconds`; this is a backstop
        proc = subprocess.Popen([sys.executable, __file__, "client", str(job_file), str(out_file)])
        try:
            code = proc.wait(limit)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the client did not finish within {limit:g} s") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        if code != 0:
            raise RuntimeError(f"the client process failed (exit {code})")
        return pickle.loads(out_file.read_bytes())


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes):
    """Send one request, read its answer: (status, body, whether the server closes the connection)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, close, chunked = None, False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value == b"close"
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
    if chunked:
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append((await reader.readexactly(size + 2))[:-2])
        await reader.readuntil(b"\r\n")
        body = b"".join(parts)
    elif length is not None:
        body = await reader.readexactly(length)
    else:
        body, close = await reader.read(), True
    return status, body, close


async def _send_all(job: dict, deadline: float, answers: list) -> None:
    requests, order = job["requests"], job["order"]
    position = iter(range(len(order)))

    async def one_connection() -> None:
        conn = None
        try:
            for k in position:
                if time.perf_counter() > deadline:
                    break
                i = order[k]
                start = time.perf_counter()
                try:
                    if conn is None:
                        conn = await asyncio.wait_for(asyncio.open_connection(HOST, job["port"]), job["timeout"])
                        start = time.perf_counter()  # connecting is not the request's time
                    status, body, close = await asyncio.wait_for(_exchange(*conn, requests[i]), job["timeout"])
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                        ValueError) as e:
                    status, body, close = 0, f"no answer: {type(e).__name__}: {e}".encode(), True
                answers.append((i, status, time.perf_counter() - start, body if job["bodies"] else None))
                if close and conn is not None:
                    conn[1].close()
                    conn = None
        finally:
            if conn is not None:
                conn[1].close()

    await asyncio.gather(*(one_connection() for _ in range(job["clients"])))


def _client_main(job_file: str, out_file: str) -> None:
    job = pickle.loads(Path(job_file).read_bytes())
    answers: list = []
    cpu, start = time.process_time(), time.perf_counter()
    asyncio.run(_send_all(job, start + job["seconds"], answers))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    Path(out_file).write_bytes(pickle.dumps({"elapsed": elapsed, "cpu": cpu, "answers": answers}))


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0-1) of ``values``: a latency some answer actually had."""
    import math

    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(round(q * len(s), 9)) - 1))] if s else float("nan")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "client":
    _client_main(sys.argv[2], sys.argv[3])
