"""The settings of ``nin serve``: one dataclass whose fields give the command's flags (:mod:`nin.cli.options`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from nin.bounds import THREADS, bounded, check_ranges, setting, within
from nin.errors import NinError

API_KEY_ENV = "NIN_API_KEY"  # the key, when --api-key is not given (a flag shows in `ps`; the environment does not)


@dataclass(frozen=True)
class ServeConfig:
    """Where ``nin serve`` listens, who may ask, and how requests are batched and bounded."""

    host: str = setting("127.0.0.1", "address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for "
                                     "every network, behind a proxy that adds TLS)")
    port: int = bounded(8000, 0, 65535, help="port to listen on (default 8000; 0: any free port, printed)")
    api_key: str | None = setting(None, f"require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: "
                                        f"${API_KEY_ENV} if set, else no key)", metavar="KEY")
    batching: bool = setting(True, "gather concurrent requests into one forward pass (default: on); off: each "
                                   "request runs alone, one at a time")
    max_batch: int = bounded(32, 1, 4096, metavar="N", help="most images in one forward pass (default 32)")
    max_delay_ms: float = bounded(5.0, 0, 10_000, metavar="MS",
                                  help="longest a request waits for others to batch with, in milliseconds (default 5)")
    max_queue: int = bounded(256, 1, 10**6, metavar="N",
                             help="most images waiting for a forward pass; beyond it a request is refused with 503 "
                                  "and Retry-After (default 256)")
    timeout_s: float = bounded(10.0, 0, 3600, lo_open=True, flags=("--timeout",), metavar="SECONDS",
                               help="longest a request may take before it is answered 504 (default 10)")
    max_bytes: int = bounded(10_000_000, 1, 2**31, metavar="BYTES",
                             help="largest request body in bytes; a larger one is refused with 413 (default "
                                  "10,000,000)")
    max_pixels: int = bounded(16_777_216, 1, 2**31, metavar="N",
                              help="refuse an image of more than N pixels before decoding it (default 16,777,216)")
    max_images: int = bounded(64, 1, 4096, metavar="N", help="most images in one request (default 64)")
    top_k: int = bounded(5, 1, 100_000, metavar="K", help="classes per image when a request does not say (default 5)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (for an ONNX file: cpu or cuda)")
    threads: int | None = within(THREADS, None, metavar="N",
                                 help="CPU threads of the forward pass (default: the usable CPUs less one, which "
                                      "is left to the event loop)")

    def validate(self) -> ServeConfig:
        """Every numeric setting in its range and a usable key; returns ``self``."""
        check_ranges(self)
        if self.api_key is not None and (not self.api_key or any(c.isspace() for c in self.api_key)
                                         or not self.api_key.isprintable()):
            raise NinError("the API key must be printable, without spaces, and not empty")
        if not self.host or any(c.isspace() for c in self.host):
            raise NinError(f"--host must be an address or a host name, got {self.host!r}")
        return self

    def with_environment(self) -> ServeConfig:
        """This config with the API key from ``$NIN_API_KEY`` when none was given (an empty one counts as unset)."""
        if self.api_key is None and os.environ.get(API_KEY_ENV):
            return replace(self, api_key=os.environ[API_KEY_ENV])
        return self

