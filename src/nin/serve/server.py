"""Running ``nin serve``: load the model, build the app, listen with uvicorn until SIGTERM or Ctrl-C.

:func:`serve` checks the ``serve`` extra is installed, loads the backend (a model that cannot be loaded is one
:class:`~nin.errors.NinError` line before anything listens), binds the address itself (so ``--port 0`` can
say which port it got, and a port in use is one line too), and prints one line once uvicorn accepts
requests::

    nin serve: nin28 on http://127.0.0.1:8000/ (batching on, max batch 32, 5 ms)

SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish (uvicorn waits for
them), drains the batcher (:meth:`nin.serve.batcher.Batcher.drain`) and returns: SIGTERM exits 0, as a
service manager expects of a clean stop; Ctrl-C is an interruption (``nin: interrupted``, 130), as for every
other command, and a second Ctrl-C stops at once.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import socket
import sys
import threading

from nin.errors import NinError
from nin.files import os_reason

# The import names of the ``serve`` extra (python-multipart is imported as python_multipart, or multipart
# before 0.0.13)
EXTRA = (("fastapi",), ("uvicorn",), ("python_multipart", "multipart"), ("prometheus_client",))
BACKLOG = 2048
SWITCH_INTERVAL_S = 0.0005  # how often a thread waiting for the GIL gets it (Python's default: 0.005)


def require_extra() -> None:
    """A NinError naming what is missing, unless everything ``nin serve`` imports is installed."""
    missing = []
    for names in EXTRA:
        for name in names:
            try:
                importlib.import_module(name)
                break
            except ImportError:
                continue
        else:
            missing.append(names[0].replace("_", "-") if names[0] == "python_multipart" else names[0])
    if missing:
        raise NinError(f"nin serve needs {', '.join(missing)}: pip install 'nin[serve]'")


def listening_line(name: str, host: str, port: int, config) -> str:
    """The line ``nin serve`` prints once it accepts requests."""
    where = f"[{host}]" if ":" in host else host
    batching = (f"batching on, max batch {config.max_batch}, {config.max_delay_ms:g} ms" if config.batching
                else "batching off")
    return f"nin serve: {name} on http://{where}:{port}/ ({batching})"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: any free port); a NinError if it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise NinError(f"--host {host}: not an address this machine can listen on ({e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise NinError(f"cannot listen on {host}:{port}: {os_reason(e)}") from None
    return sock


def serve(path: str | os.PathLike, config) -> None:
    """Serve the model at ``path`` (a run, a checkpoint or an ``.onnx`` file) with ``config`` (a ServeConfig)
    until SIGTERM; returns once every request in flight is answered."""
    require_extra()
    config = config.with_environment().validate()
    import uvicorn

    from nin.serve.app import create_app
    from nin.serve.backends import load_backend

    # The forward pass runs in a worker thread and needs the GIL between its operations, while the event loop
    # holds it to parse and answer requests: with Python's default 5 ms switch interval the forward thread
    # waits up to 5 ms at each hand-over under load. A shorter interval lets them take turns.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    backend = load_backend(path, config)
    app = create_app(backend, config)
    # torch, FastAPI and the model are millions of long-lived objects: a full garbage collection would scan them
    # all, pausing every request for a tenth of a second or more (it showed as the p99 latency under load).
    # Frozen, they are left out of every collection; only what requests allocate is scanned.
    gc.collect()
    gc.freeze()
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(listening_line(backend.card["name"], host, port, config), flush=True)

    server = Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                   server_header=False, backlog=BACKLOG))
    # uvicorn handles SIGTERM itself (a graceful stop), then raises it again with the handler it found: this
    # one, so that a stop asked for is a clean exit rather than death by the signal.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stopped) if main else None
    try:
        server.run(sockets=[sock])
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
    if not server.started:
        raise NinError("the server did not start (the reason is above)")


def _stopped(signum, frame) -> None:
    """SIGTERM after uvicorn's graceful stop: nothing left to do."""
