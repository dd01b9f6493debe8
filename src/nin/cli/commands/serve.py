"""``nin serve``: a trained model (a run, a checkpoint, or an ONNX file from ``nin export``) behind an HTTP API.

Building this parser imports no torch, so ``nin serve FILE.onnx`` runs without it (:mod:`nin.cli.main`)."""

from __future__ import annotations

import argparse

from nin.cli.options import _path, add_settings, flagged, given_fields


def add_parsers(sub) -> None:
    from nin.serve.config import ServeConfig

    p = sub.add_parser("serve", help="serve a trained model over HTTP: predictions, class maps, a web page",
                       description="Serve a run, a checkpoint or an ONNX file (nin export) over HTTP: POST "
                                   "/v1/predict, POST /v1/cam, GET /v1/model, /metrics, /healthz, /readyz, the "
                                   "web page at /, the API's docs at /docs. Concurrent requests are batched "
                                   "into one forward pass. Needs pip install 'nin[serve]'.")
    p.add_argument("model", type=_path, metavar="RUN_OR_CHECKPOINT_OR_ONNX",
                   help="run directory, checkpoint directory, or .onnx file written by nin export")
    add_settings(p.add_argument_group("serving"), ServeConfig, "", flagged(ServeConfig), plain=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from nin.serve.config import ServeConfig
    from nin.serve.server import serve

    serve(args.model, ServeConfig(**given_fields(args, ServeConfig)))
    return 0
