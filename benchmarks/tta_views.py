"""What more test-time views and ensembles of runs would give, scored on held-out images (never the test set).

    python benchmarks/tta_views.py RUN [RUN ...] [--views flip,flip+x1,...] [--ensembles 2]

Each RUN is a finished ``nin train --holdout N`` run directory (or checkpoint). For each run it prints the
accuracy on its held-out images with each set of views below (the mean of the softmax outputs over the views),
then, for every combination of up to ``--ensembles`` runs, the accuracy of their mean (each run with flip TTA,
what ``--tta`` does). The runs must share the held-out images: the same ``--holdout`` and data set.

Views are the image, its mirror image (``flip``) and shifts by one pixel (edge pixels repeated): ``x1`` left and
right, ``xy1`` the eight neighbours, ``cross`` the four. Models run in fp32 on the CPU, so a run scored in bf16
during training can differ by a few hundredths of a point. Nothing here is pass/fail; the machine kind
(``nin doctor``) is printed with the figures.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from nin.analysis.doctor import fingerprint  # noqa: E402
from nin.errors import NinError  # noqa: E402
from nin.inference.trained import load_trained  # noqa: E402
from nin.inference.tta import tta_probabilities  # noqa: E402
from nin.training.run import build  # noqa: E402

#: View sets: (mirrored, dx, dy) for each view averaged. ``flip`` is scored by nin's own ``--tta``
#: (:func:`nin.inference.tta.tta_probabilities`), the set every other one is compared with.
VIEWS = {
    "none": [(0, 0, 0)],
    "flip": [(0, 0, 0), (1, 0, 0)],
    "flip+x1": [(f, dx, 0) for f in (0, 1) for dx in (-1, 0, 1)],
    "flip+cross": [(f, dx, dy) for f in (0, 1) for dx, dy in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))],
    "flip+xy1": [(f, dx, dy) for f in (0, 1) for dx in (-1, 0, 1) for dy in (-1, 0, 1)],
}


def view(x: torch.Tensor, flip: int, dx: int, dy: int) -> torch.Tensor:
    """``x`` (N, C, H, W) mirrored if ``flip``, then moved by (dx, dy) pixels with its edge pixels repeated."""
    x = x.flip(-1) if flip else x
    if dx == 0 and dy == 0:
        return x
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return p[:, :, 1 - dy:1 - dy + x.shape[2], 1 - dx:1 - dx + x.shape[3]]


def holdout_probs(run: str, views: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Softmax outputs on the run's held-out images, averaged over each view set, the labels, and the holdout."""
    trained = load_trained(run, "cpu")
    holdout = trained.config.data.holdout
    if not holdout:
        raise NinError(f"{run}: not trained with --holdout, and this script never scores the test set")
    loader = build(trained.config, init=False).test_loader
    needed = sorted({v for name in views for v in VIEWS[name]})
    sums: dict[str, list[torch.Tensor]] = {name: [] for name in views}
    labels = []
    with torch.inference_mode():
        for x, y in loader:
            out = {v: trained.model(view(x, *v)).float().softmax(1) for v in needed}
            for name in views:
                sums[name].append(tta_probabilities(trained.model, x) if name == "flip"
                                  else sum(out[v] for v in VIEWS[name]) / len(VIEWS[name]))
            labels.append(y)
    return {name: torch.cat(p) for name, p in sums.items()}, torch.cat(labels), holdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="nin train --holdout run directories or checkpoints")
    ap.add_argument("--views", default=",".join(VIEWS), help=f"view sets to score (of {', '.join(VIEWS)})")
    ap.add_argument("--ensembles", type=int, default=2, help="largest number of runs averaged (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    views = [v.strip() for v in args.views.split(",") if v.strip()]
    if not views:
        print(f"tta_views: --views names no view set (choose from {', '.join(VIEWS)})", file=sys.stderr)
        return 2
    if unknown := [v for v in views if v not in VIEWS]:
        print(f"tta_views: unknown view set {unknown[0]!r} (choose from {', '.join(VIEWS)})", file=sys.stderr)
        return 2
    if args.ensembles < 1:
        print(f"tta_views: --ensembles must be at least 1, got {args.ensembles}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {fingerprint().get('kind', 'unknown')}; accuracy on held-out training images, fp32")
    flip = "flip" if "flip" in views else views[0]
    scored: list[tuple[str, dict]] = []
    labels = None
    try:
        for run in args.runs:
            probs, y, holdout = holdout_probs(run, sorted(set(views) | {flip}))
            if labels is not None and (len(y) != len(labels) or not torch.equal(y, labels)):
                raise NinError(f"{run}: its held-out images are not the first run's (another --holdout or data set)")
            labels = y
            scored.append((run, probs))
            cells = "  ".join(f"{name} {(probs[name].argmax(1) == y).double().mean().item():.2%}" for name in views)
            print(f"{run} ({holdout} held out): {cells}", flush=True)
    except NinError as e:
        print(f"tta_views: {e}", file=sys.stderr)
        return 2
    for k in range(2, min(args.ensembles, len(scored)) + 1):
        for combo in itertools.combinations(scored, k):
            p = sum(probs[flip] for _, probs in combo)
            names = " + ".join(run for run, _ in combo)
            print(f"ensemble ({flip}) of {names}: {(p.argmax(1) == labels).double().mean().item():.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
