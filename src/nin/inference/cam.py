"""Class activation maps: where in the image a NiN found each class.

A NiN's last block has one channel per class and its head averages each channel
into that class's logit, so channel ``k`` of the last block *is* a map of the
evidence for class ``k``: its mean is the logit (Zhou et al., "Learning Deep
Features for Discriminative Localization", CVPR 2016, built class activation
maps on this design). :func:`class_maps` returns those maps; :func:`plot_cams`
upsamples them to the image and overlays them as heat maps.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nin.errors import NinError


def check_cam_model(model: nn.Module) -> None:
    """Class maps exist only where the head is global average pooling over one channel per class."""
    head = getattr(model, "head", None)
    if not (hasattr(model, "forward_features") and head is not None
            and isinstance(getattr(head, "gap", None), nn.AdaptiveAvgPool2d)):
        raise NinError("class activation maps need a NiN whose head averages one map per class; this model has "
                       "a fully connected head (head=fc, or a classic model)")


@torch.inference_mode()
def class_maps(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, K]`` and class maps ``[N, K, h, w]`` of a batch; each map's mean is its logit."""
    check_cam_model(model)
    maps = model.forward_features(x)  # (N, classes, h, w)
    return model.forward_head(maps), maps  # (N, classes), (N, classes, h, w)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps ``[..., h, w]`` resized to ``size`` (bilinear), each scaled to 0-1 for display."""
    m = F.interpolate(maps.float().reshape(-1, 1, *maps.shape[-2:]), size=size, mode="bilinear",
                      align_corners=False).reshape(*maps.shape[:-2], *size)
    lo = m.flatten(-2).min(-1).values[..., None, None]
    hi = m.flatten(-2).max(-1).values[..., None, None]
    return (m - lo) / (hi - lo).clamp(min=1e-12)


def plot_cams(panels: list[list[dict]], path: str | os.PathLike, title: str = "", *, exclusive: bool = False) -> Path:
    """A grid of overlays (:func:`cam_figure`) saved as a PNG. ``exclusive``: never over an existing file."""
    from nin.plots import _save

    return _save(cam_figure(panels, title), path, exclusive=exclusive)


def cam_figure(panels: list[list[dict]], title: str = ""):
    """A matplotlib figure of overlays. ``panels[row][col]`` holds ``image`` (H x W or H x W x 3 uint8 array),
    ``map`` (H x W, 0-1) and ``title``. Saved by :func:`plot_cams`, or logged as an image (TensorBoard)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows), dpi=120, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, row in enumerate(panels):
        for j, p in enumerate(row):
            ax = axes[i][j]
            ax.imshow(p["image"], cmap="gray" if p["image"].ndim == 2 else None)
            ax.imshow(p["map"], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(p["title"], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def cam_panels(trained, images: torch.Tensor, top_k: int, labels: torch.Tensor | None = None) -> list[list[dict]]:
    """One row per uint8 image ``[C, H, W]`` (stored size): the maps of its ``top_k`` classes, titled with
    class name and probability (and the true class, where ``labels`` are given)."""
    check_cam_model(trained.model)
    logits, maps = zip(*(class_maps(trained.model.eval(), x) for x, _ in trained.loader(images)))
    probs, maps = torch.cat(logits).float().softmax(1).cpu(), torch.cat(maps).cpu()
    k = min(top_k, probs.shape[1])
    top = probs.topk(k, dim=1)
    shown = upsample(maps, tuple(images.shape[2:]))
    rows = []
    for n, img in enumerate(images):
        picture = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        row = []
        for p, c in zip(top.values[n].tolist(), top.indices[n].tolist()):
            title = f"{trained.classes[c]} {p:.2f}"
            if labels is not None:
                title += f"\n(true: {trained.classes[int(labels[n])]})"
            row.append({"image": picture, "map": shown[n, c].numpy(), "title": title})
        rows.append(row)
    return rows


GRID_COLUMNS = 8  # test images per row of a --grid figure


def grid_panels(trained, n: int, data_dir: str | None = None) -> tuple[list[list[dict]], str]:
    """The first ``n`` images of the run's test split, each with its top class map and true class, laid out in
    rows of :data:`GRID_COLUMNS`; and the figure's title."""
    from nin.inference.evaluate import checked_test_split

    test = checked_test_split(trained, data_dir)
    n = min(n, len(test.images))
    flat = [row[0] for row in cam_panels(trained, test.images[:n], 1, test.labels[:n])]
    panels = [flat[i:i + GRID_COLUMNS] for i in range(0, len(flat), GRID_COLUMNS)]
    return panels, f"{trained.name}: top class map of {n} test images"


def image_panels(trained, images, top_k: int) -> tuple[list[list[dict]], str]:
    """One row per image: the class maps of its ``top_k`` classes; and the figure's title."""
    title = f"{trained.name}: class maps of the top {min(top_k, len(trained.classes))} classes"
    return cam_panels(trained, images, top_k), title
