"""Batch-1 latency of `nin predict` on this machine: one image file, end to end, and the model alone.

    python benchmarks/predict_latency.py RUN_OR_CHECKPOINT [--repeats 200] [--threads 1]

End to end is what `predict_files` does for one PNG: decode, resize to the stored size, the run's
pipeline (resize, normalize), the forward pass and the softmax/top-k. The model-alone figure is the
forward pass of one prepared image. Both are medians over --repeats after 10 warm-up calls.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image


def median_ms(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    from nin.inference.predict import predict_files
    from nin.inference.trained import load_trained
    from nin.models.fold import fold_batchnorm
    from nin.training.runtime import configure_runtime

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    configure_runtime(args.threads)
    trained = load_trained(args.checkpoint, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "image.png"
        Image.new("L", (96, 96), 128).save(img)
        end_to_end = median_ms(lambda: predict_files(trained, [img], top_k=5), args.repeats)
    x = torch.rand(1, *trained.model.input_size)
    folded = fold_batchnorm(trained.model).eval()
    with torch.inference_mode():
        model_only = median_ms(lambda: folded(x), args.repeats)
    print(f"{trained.name} on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}:")
    print(f"  nin predict, one 96x96 PNG end to end: {end_to_end:.2f} ms")
    print(f"  model forward alone (BatchNorm folded): {model_only:.2f} ms")


if __name__ == "__main__":
    main()
