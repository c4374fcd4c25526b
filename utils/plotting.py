"""Pictures: a scan's frame-corner trajectories in 3D, drift against frame index, training curves."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from utils.atomic import atomic_path  # noqa: E402


def plot_corner_trajectories(corners_true, corners_pred, path, title: str = "", every: int = 1) -> None:
    """3D plot of the four image corners of every frame, ground truth against prediction.

    Args:
        corners_true, corners_pred: [N, 3, 4] corner positions in the first frame's image mm
            (frame 0 included), corners in the order of ``utils.transform.image_corners``:
            (1,1), (W,1), (1,H), (W,H). ``corners_pred`` may be None.
        path: PNG to write (atomically).
        every: draw the outline of every ``every``-th frame; corner tracks use all frames.
    """
    fig = plt.figure(figsize=(7, 6))
    ax = fig.add_subplot(projection="3d")
    series = [("ground truth", corners_true, "tab:blue")]
    if corners_pred is not None:
        series.append(("prediction", corners_pred, "tab:red"))
    outline = [0, 1, 3, 2, 0]  # corner order is row-major, so walk the rectangle 0-1-3-2
    for label, corners, colour in series:
        corners = np.asarray(corners)
        for k in range(4):
            ax.plot(*corners[:, :, k].T, color=colour, lw=0.8, label=label if k == 0 else None)
        for frame in corners[::every]:
            ax.plot(*frame[:, outline], color=colour, lw=0.3, alpha=0.5)
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.set_zlabel("z (mm)")
    ax.set_title(title)
    ax.legend(loc="upper left")
    _save(fig, path)


def plot_drift(frame_errors, path, title: str = "", ylabel: str = "mean pixel error (mm)") -> None:
    """Per-frame global error against frame index (frames 1..N-1): how the chained pose drifts."""
    frame_errors = np.asarray(frame_errors)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(np.arange(1, len(frame_errors) + 1), frame_errors, lw=1.0)
    ax.set_xlabel("frame index")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_training_curves(epochs, panels: dict, path, title: str = "", ylabels: dict | None = None,
                         references: dict | None = None, log_panels=()) -> None:
    """Curves against epoch, one panel per entry of ``panels``: ``{panel title: {curve name: values}}``.

    NaN points are skipped (e.g. whole-scan figures computed every few epochs); a curve whose name
    ends in ``identity`` is drawn dashed, as the reference a method must beat. Used for a run's
    ``curves.png`` (point distances in one panel, whole-scan GPE/LPE in another: their scales differ
    by an order of magnitude). ``ylabels`` gives a panel's y label (default mm), ``references`` a
    horizontal line to draw in a panel (e.g. 1 for ratios to no motion); the panels named in
    ``log_panels`` get a logarithmic y axis (losses, ratios: a change from 0.06 to 0.03 is as
    visible as one from 1 to 0.5).
    """
    epochs = np.asarray(epochs, dtype=float)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (panel_title, series) in zip(axes[0], panels.items()):
        for name, values in series.items():
            values = np.asarray(values, dtype=float)
            keep = np.isfinite(values)
            if keep.any():
                style = dict(ls="--", lw=1.0) if name.endswith("identity") else dict(marker="o", ms=3, lw=1.2)
                ax.plot(epochs[keep], values[keep], label=name, **style)
        if references and panel_title in references:
            ax.axhline(references[panel_title], color="grey", ls=":", lw=1.0)
        if panel_title in log_panels:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel((ylabels or {}).get(panel_title, "mm"))
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def _save(fig, path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
