"""Training and inference images/sec of registered models, through the real trainer.

    python benchmarks/speed.py                       # nin_d2l at 224 (batch 128) and nin28 at 28 (batch 256)
    python benchmarks/speed.py --model nin28 --batch 512 --steps 20 --device cuda

Data are random uint8 images resident on the device, fed through the same
DeviceLoader as training (normalization and, for nin_d2l, the resize to 224 on
the device), so the figures include the input pipeline. Training runs
``--warmup`` steps, then times the next ``--steps`` steps as one block.
Inference reports the median of three timed passes over ``--steps`` eval
batches with no autograd. Every setting used is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from nin.loader import DeviceLoader
from nin.models import create_model, init_weights
from nin.run import resolve_device
from nin.train import TrainConfig, Trainer, evaluate

CASES = {"nin_d2l": (224, 128), "nin28": (28, 256)}


def synthetic(n: int, channels: int, side: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, size: int, batch: int, steps: int, warmup: int, device: torch.device, args) -> dict:
    torch.manual_seed(0)
    model = init_weights(create_model(name), "kaiming").to(device)
    c = model.input_size[0]
    x, y = synthetic(batch * (steps + warmup), c, 28, device)  # stored at 28x28 like Fashion-MNIST
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.01, schedule="constant", amp=args.amp,
                      channels_last=args.channels_last, compile=args.compile, label_smoothing=0.0)
    loader = DeviceLoader(x, y, batch, shuffle=True, size=(size, size), channels_last=args.channels_last)
    trainer = Trainer(model, cfg, loader)

    warm = TrainConfig(**{**cfg.__dict__, "max_steps": warmup})
    trainer.config = warm
    trainer.fit()
    sync(device)
    trainer.config = cfg
    t0 = time.perf_counter()
    trainer.fit()
    sync(device)
    train_rate = steps * batch / (time.perf_counter() - t0)

    eval_loader = DeviceLoader(x[: batch * steps], y[: batch * steps], batch, size=(size, size),
                               channels_last=args.channels_last)
    evaluate(trainer.step_model, eval_loader, autocast=trainer.autocast)  # warm-up
    rates = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        evaluate(trainer.step_model, eval_loader, autocast=trainer.autocast)
        sync(device)
        rates.append(batch * steps / (time.perf_counter() - t0))
    return {"model": name, "input": f"{c}x{size}x{size}", "batch": batch, "train_img_s": train_rate,
            "infer_img_s": statistics.median(rates)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(CASES), action="append", help="default: all")
    p.add_argument("--batch", type=int, help="batch size (default: per model)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("none", "bf16"), default="none")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__} on {where}; dtype {'bf16 autocast' if args.amp == 'bf16' else 'fp32'}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, compile={args.compile}, "
          f"{args.warmup} warm-up + {args.steps} timed steps")
    print(f"{'model':<10}{'input':<12}{'batch':>6}{'train img/s':>14}{'infer img/s':>14}")
    for name in args.model or sorted(CASES):
        size, batch = CASES[name]
        r = bench(name, size, args.batch or batch, args.steps, args.warmup, device, args)
        print(f"{r['model']:<10}{r['input']:<12}{r['batch']:>6}{r['train_img_s']:>14,.1f}{r['infer_img_s']:>14,.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
