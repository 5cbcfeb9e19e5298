"""The training curves as a picture: `reports/<task>/loss.png`, written by the train stage
(DVC shows it with `dvc plots show`; it is also an artifact of the MLflow run)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_bytes


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that hold a finite `key` (validation rows are sparse; the CSV
    leaves the others empty)."""
    steps, values = [], []
    for row in history:
        try:
            step, value = float(row["step"]), float(row[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(value):
            steps.append(step)
            values.append(value)
    return steps, values


def loss_png(history: Sequence[dict[str, Any]], title: str = "training loss", weights_step: int | None = None) -> bytes:
    """Train and validation loss against step, the learning rate in a panel beneath (PNG bytes);
    a dashed line at `weights_step` when the run hands on another step's weights than its last
    (`trainer.export_weights: best`). matplotlib's Agg canvas is used directly: no pyplot, no
    global backend, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, val, lr = (_series(history, k) for k in ("loss", "val_loss", "lr"))
    if not train[0]:
        raise ValueError("the training history has no finite loss to plot")
    fig = Figure(figsize=(7, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    marker = "o" if len(train[0]) < 20 else None
    loss_ax.plot(*train, color="C0", marker=marker, markersize=3, label="train loss")
    if val[0]:
        loss_ax.plot(*val, color="C1", marker="o", markersize=4, label="validation loss")
    if weights_step is not None:
        loss_ax.axvline(weights_step, color="C3", linestyle="--", linewidth=1,
                        label=f"weights handed on (step {weights_step})")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(title)
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(loc="upper right")
    if lr[0]:
        lr_ax.plot(*lr, color="C2", marker=marker, markersize=3)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_loss_plot(history: Sequence[dict[str, Any]], path: Path | str, title: str = "training loss",
                    weights_step: int | None = None) -> Path:
    """`loss_png` written atomically to `path` (a reader never sees half an image)."""
    path = Path(path)
    atomic_write_bytes(path, loss_png(history, title, weights_step))
    return path
