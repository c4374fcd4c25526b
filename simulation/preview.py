"""Quick looks at a dataset: a montage of frames across each scan and its probe trajectory in 3D.

Works on any dataset in the challenge layout (simulated or real): it reads only the official files.
For each previewed scan ``<NNN>_<scan>``:

- ``<NNN>_<scan>_frames.png``: ``num_frames`` frames evenly spaced over the scan (frame index and
  the scan's landmarks that fall on a shown frame, as red dots);
- ``<NNN>_<scan>_trajectory.png``: the four image corners of every frame in the first frame's image
  mm (``T_{0<-i} . S . corner``), drawn by ``utils.plotting.plot_corner_trajectories``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.calibration import load_calibration
from utils.challenge_data import CALIB_FILE, ScanFile, find_scans, read_landmarks


def corner_trajectories(tforms: np.ndarray, scale: np.ndarray, calib_r_t: np.ndarray, height: int, width: int):
    """[N, 3, 4] image corners (1,1), (W,1), (1,H), (W,H) of every frame in frame 0's image mm."""
    tforms = np.asarray(tforms, dtype=np.float64)
    corners = np.array([[1, width, 1, width], [1, 1, height, height], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=np.float64)
    # T_{0<-i} = C^-1 tforms[0]^-1 tforms[i] C (DESIGN.md section 2)
    to_first = np.linalg.inv(calib_r_t) @ np.linalg.inv(tforms[0]) @ tforms @ calib_r_t
    return (to_first @ (scale @ corners))[:, :3]


def _montage(frames, indices, landmarks, path, title):
    from utils.atomic import atomic_path
    from utils.plotting import plt  # its import selects the Agg backend (files only)

    cols = 4
    rows = int(np.ceil(len(indices) / cols))
    height, width = frames.shape[1:]
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows * height / width + 0.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, index, frame in zip(axes.ravel(), indices, frames):
        ax.imshow(frame, cmap="gray", vmin=0, vmax=255, extent=(0.5, width + 0.5, height + 0.5, 0.5))
        if landmarks is not None:
            on_frame = landmarks[landmarks[:, 0] == index]
            ax.plot(on_frame[:, 1], on_frame[:, 2], "r.", ms=4)
        ax.set_title(f"frame {index}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_preview(root, out_dir, num_frames: int = 12, max_scans: int | None = 4) -> list[Path]:
    """Write the frame montage and trajectory plot of the first ``max_scans`` scans (None: all).

    Returns the written PNG paths. Raises as ``find_scans`` / ``load_calibration`` for a missing or
    malformed dataset.
    """
    from utils.plotting import plot_corner_trajectories

    root, out_dir = Path(root), Path(out_dir)
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: expected >= 1")
    refs = find_scans(root)  # first: its error says best what a folder that is not a dataset lacks
    calibration = load_calibration(root / CALIB_FILE)
    if max_scans is not None:
        refs = refs[:max_scans]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ref in refs:
        with ScanFile(ref) as scan:
            count = scan.num_frames
            height, width = scan.frame_size
            indices = np.unique(np.linspace(0, count - 1, min(num_frames, count)).round().astype(np.int64))
            frames = scan.read_frames(indices)
            tforms = scan.read_tforms()
        landmarks = None
        if ref.landmark_path is not None:
            try:
                landmarks = read_landmarks(ref.landmark_path, ref.name, count, height, width)
            except ValueError:  # a subject file without this scan's landmarks: preview the frames anyway
                landmarks = None
        stem = f"{ref.subject_folder}_{ref.name}"
        frames_path = out_dir / f"{stem}_frames.png"
        _montage(frames, indices, landmarks, frames_path, f"{ref.key}: {count} frames of {height}x{width}")
        corners = corner_trajectories(tforms, calibration.scale, calibration.calib_R_T, height, width)
        trajectory_path = out_dir / f"{stem}_trajectory.png"
        plot_corner_trajectories(corners, None, trajectory_path, title=f"{ref.key}: image corners (frame 0 image mm)",
                                 every=max(1, count // 50))
        written += [frames_path, trajectory_path]
    return written
