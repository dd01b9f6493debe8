"""Dynamic batching for ``nin serve``: concurrent requests share one forward pass.

A request hands its decoded images to :meth:`Batcher.submit` and awaits the answer. One worker task takes the
oldest waiting request, then keeps gathering the requests behind it until it holds ``max_batch`` images or
``max_delay_ms`` have passed since it started gathering, and runs ONE forward pass over all of them in a
single worker thread (``run_in_executor``), so the event loop keeps accepting and decoding requests while the
model computes. The probabilities (and class maps) are split back to each request in order.

It waits only for requests on their way: a request counts as one from the moment the server starts reading
its body until it is submitted or refused (:meth:`Batcher.incoming`). With none on their way there is
nothing to wait for, so a lone request runs at once and batching costs it no latency; under load, the
requests that arrive while a forward pass runs are waiting when it ends, and form the next batch.

With ``batching=False`` each request is its own forward pass, one at a time. A request larger than
``max_batch`` (``--max-images`` above ``--max-batch``) runs alone, in passes of ``max_batch`` images.

Back-pressure: at most ``max_queue`` images wait for a forward pass; a request beyond that is refused at
once with :class:`QueueFull` (503 with ``Retry-After``) rather than queued without bound. A request whose
caller gave up (its timeout passed: 504) is dropped from the queue. :meth:`Batcher.drain` stops new
requests (:class:`Draining`), answers every request already waiting, and returns when the worker is done:
what SIGTERM does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

Infer = Callable[[np.ndarray, bool], "tuple[np.ndarray, np.ndarray | None]"]


class QueueFull(Exception):
    """More images would be waiting than ``max_queue`` allows: come back later."""


class Draining(Exception):
    """The batcher is not running: starting, or shutting down."""


@dataclass
class _Job:
    images: np.ndarray  # uint8 [N, C, H, W]
    maps: bool
    future: asyncio.Future


class Batcher:
    """Gathers submitted images into forward passes of ``infer`` (a backend's), run in one worker thread."""

    def __init__(self, infer: Infer, config, metrics=None) -> None:
        self._infer = infer
        self.config = config
        self.metrics = metrics
        self._queue: deque[_Job] = deque()
        self._waiting = 0  # images in the queue
        self._incoming = 0  # requests being read or decoded: on their way to submit()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._closing = False

    @property
    def running(self) -> bool:
        """Accepting requests: started, and not draining."""
        return self._worker is not None and not self._worker.done() and not self._closing

    @property
    def waiting(self) -> int:
        """Images waiting for a forward pass."""
        return self._waiting

    @contextlib.contextmanager
    def incoming(self):
        """Around reading and decoding a request: the worker may wait (up to ``max_delay_ms``) for it to join
        the next forward pass, and only for such requests."""
        self._incoming += 1
        if self.metrics is not None:
            self.metrics.incoming.set(self._incoming)
        try:
            yield
        finally:
            self._incoming -= 1
            if self.metrics is not None:
                self.metrics.incoming.set(self._incoming)
            if self._incoming == 0 and self._arrived is not None:
                self._arrived.set()  # nothing more on its way: the gathering batch need not wait

    async def start(self) -> None:
        """Start the worker (on the running event loop)."""
        self._arrived = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nin-forward")
        self._closing = False
        self._worker = asyncio.create_task(self._run(), name="nin-batcher")

    async def drain(self) -> None:
        """Refuse new requests, answer those waiting, stop the worker and its thread."""
        self._closing = True
        if self._arrived is not None:
            self._arrived.set()
        if self._worker is not None:
            await self._worker
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    async def submit(self, images: np.ndarray, maps: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities ``[N, K]`` (and class maps ``[N, K, h, w]`` if ``maps``) of uint8 ``images``."""
        if not self.running:
            raise Draining("the server is shutting down" if self._closing else "the server is starting")
        n = len(images)
        if self._waiting and self._waiting + n > self.config.max_queue:
            raise QueueFull(f"{self._waiting} images are waiting already (--max-queue {self.config.max_queue})")
        job = _Job(images, maps, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._count(n)
        self._arrived.set()
        return await job.future

    def _count(self, change: int) -> None:
        self._waiting += change
        if self.metrics is not None:
            self.metrics.queue.set(self._waiting)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._gather()) is not None:
            if not batch:
                continue
            images = batch[0].images if len(batch) == 1 else np.concatenate([j.images for j in batch])
            try:
                probs, maps = await loop.run_in_executor(self._pool, self._forward, images,
                                                         any(j.maps for j in batch))
            except Exception as e:  # noqa: BLE001  each caller gets the failure; the worker goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            start = 0
            for job in batch:
                end = start + len(job.images)
                if not job.future.done():  # (its caller may have timed out)
                    job.future.set_result((probs[start:end], maps[start:end] if job.maps else None))
                start = end

    async def _gather(self) -> list[_Job] | None:
        """The next forward pass's requests ([] if all it found were abandoned); None once drained."""
        while not self._queue:
            if self._closing:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.max_delay_ms / 1000
        limit = self.config.max_batch if self.config.batching else 0
        batch: list[_Job] = []
        count = 0
        while True:
            while self._queue and (not batch or count + len(self._queue[0].images) <= limit):
                job = self._queue.popleft()
                if job.future.cancelled():  # its caller gave up
                    self._count(-len(job.images))
                else:
                    batch.append(job)
                    count += len(job.images)
            remaining = deadline - loop.time()
            done = not batch or count >= limit or self._queue or remaining <= 0 or self._closing
            if done or not self._incoming:  # (nothing on its way: nothing to wait for)
                self._count(-count)  # they wait no more: they are the next forward pass
                return batch
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _forward(self, images: np.ndarray, maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """In the worker thread: ``infer`` over ``images``, in passes of at most ``max_batch``."""
        step = self.config.max_batch
        parts = []
        for i in range(0, len(images), step):
            start = time.perf_counter()
            parts.append(self._infer(images[i:i + step], maps))
            if self.metrics is not None:
                self.metrics.forward.observe(time.perf_counter() - start)
                self.metrics.batch.observe(len(images[i:i + step]))
        if len(parts) == 1:
            return parts[0]
        return (np.concatenate([p for p, _ in parts]),
                np.concatenate([m for _, m in parts]) if maps else None)
