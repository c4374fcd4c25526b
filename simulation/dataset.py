"""Synthetic TUS-REC datasets: presets and the generator that writes them in the challenge layout.

``generate_dataset(root, preset, seed, ...)`` samples, for every subject and arm, a forearm phantom
(``simulation.phantom``), then per scan a probe trajectory (``simulation.trajectory``), renders the
frames (``simulation.imaging``, in worker processes), picks landmarks (``simulation.landmarks``) and
writes everything through ``utils.challenge_data`` / ``utils.calibration``, in the train layout
(``frames_transfs/``) or the validation/test layout (``frames/`` + ``transfs/`` + ``dataset_keys.h5``).

Poses (DESIGN.md sections 2-3): frames are rendered at the image-plane poses ``T_tissue<-image_mm``;
the tracker records ``tforms[i] = T_cam<-tissue . T_tissue<-image_mm[i] . C^-1`` (tool -> camera)
where ``C`` is the calibration's rigid part (the real one by default) and ``T_cam<-tissue`` a fixed
random rigid pose per scan (where the optical camera stands). ``tforms`` are written as float32.

Reduced frame sizes keep the probe's field of view: the pixel size becomes
``S = diag(sx * 640 / W, sy * 480 / H, 1, 1)`` and that ``S`` is what ``calib_matrix.csv`` holds.

Side data, outside the official files (readers of the challenge layout never look there)::

    <root>/simulation/<NNN>/<scan>.h5
        tform_camera_from_tissue   float64 [4, 4]      T_cam<-tissue of the scan (mm)
        tform_tissue_from_image    float64 [N, 4, 4]   image mm -> tissue mm, per frame
        tform_tissue_from_probe    float64 [N, 4, 4]   probe frame -> tissue mm, per frame
        landmarks                  int64 [K, 3]        as in landmark_<NNN>.h5 (frame, x, y)
        landmark_points            float64 [K, 3]      each landmark's tissue point (mm)
        landmark_kinds             bytes [K]           bone / fascia / vessel / skin / boundary / bright
        noise_seeds                int64 [N]           the renderer's per-frame noise seed
        phantom_parameters         bytes (JSON)        PhantomParameters.to_dict() of the arm
        trajectory                 bytes (JSON)        the protocol's scalar settings
        generator                  bytes (JSON)        preset, seed, subject, arm, scan name

Everything is deterministic for a seed: every random draw comes from a ``numpy.random.SeedSequence``
keyed by (seed, subject, arm or scan, purpose); h5py writes no timestamps by default; every file is
written to a temporary name then renamed (``utils.atomic``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from simulation import landmarks as sim_landmarks
from simulation import trajectory as sim_trajectory
from simulation.probe import CurvilinearProbe, ImageGeometry
from utils.atomic import atomic_path
from utils.calibration import default_calibration, write_calib_matrices
from utils.challenge_data import (
    CALIB_FILE,
    LAYOUT_TEST,
    LAYOUT_TRAIN,
    LAYOUTS,
    ScanRef,
    dataset_key,
    subject_folder,
    write_dataset_keys,
    write_landmarks,
    write_scan,
)
from utils.hdf5_writing import writing_hdf5

logger = logging.getLogger(__name__)

PROTOCOLS = ("rotation", "sweeps")
ROTATION_SCANS = ("LH_rotation", "RH_rotation")
SIDE_FOLDER = "simulation"
REFERENCE_SIZE = (480, 640)  # (H, W) of the real frames, which the calibration's pixel size is for

# Seed-sequence purposes: fixed integers so adding a purpose never changes the others' draws.
_PHANTOM, _SCATTERERS, _TRAJECTORY, _NOISE, _LANDMARKS, _CAMERA, _HABIT = range(7)


@dataclass(frozen=True)
class Preset:
    """What a dataset holds. Fields not given by a preset keep these defaults (the real data's)."""

    protocol: str = "rotation"  # "rotation" (2025: LH_rotation, RH_rotation) or "sweeps" (2024: 24 scans)
    subjects: int = 50
    frames: int | None = 1500  # per scan; None: the sweep's natural length (path length / speed)
    height: int = 480
    width: int = 640
    landmarks: int = 100  # per scan
    num_lines: int = 256  # beam lines of the probe's grid
    num_samples: int = 600  # range samples of the probe's grid
    density: float = 10.0  # scatterers per mm^3 (SIMULATOR.md: 10 by default)
    medium_spacing: float = 0.5  # mm, voxel of the attenuation volume (bone shadows' edges)
    # Rotation scans: probability that each fan, rock and turn goes the sonographer's habitual way;
    # 0.5, no habit: the challenge publishes the order of the moves, not their directions
    # (README, "Simulated data": direction cues).
    habit: float = sim_trajectory.HABIT_NONE
    reason: str = ""

    def validate(self) -> Preset:
        """Return self or raise ValueError naming the bad field, its value and what is allowed."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol={self.protocol!r} is not one of {list(PROTOCOLS)}")
        checks = [("subjects", self.subjects, 1), ("height", self.height, 16), ("width", self.width, 16),
                  ("landmarks", self.landmarks, 1), ("num_lines", self.num_lines, 2),
                  ("num_samples", self.num_samples, 2)]
        if self.frames is not None:
            checks.append(("frames", self.frames, 2))
        for name, value, low in checks:
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r}: expected an integer >= {low}")
        if not self.medium_spacing > 0:
            raise ValueError(f"medium_spacing={self.medium_spacing!r}: expected a positive voxel size in mm")
        if not (isinstance(self.habit, (int, float, np.floating)) and not isinstance(self.habit, bool)
                and 0.0 <= self.habit <= 1.0):
            raise ValueError(f"habit={self.habit!r}: expected a probability in [0, 1] (0.5: no habit)")
        if self.protocol != "rotation" and self.habit != sim_trajectory.HABIT_NONE:
            raise ValueError(f"habit={self.habit!r} sets the directions of the rotation protocol's moves; "
                             f"protocol={self.protocol!r} has none (leave habit at 0.5)")
        if not self.density > 0:
            raise ValueError(f"density={self.density!r}: expected a positive number of scatterers per mm^3")
        if self.frames is None and self.protocol == "rotation":
            raise ValueError("frames=None (natural length) is only defined for protocol='sweeps'")
        return self

    def scan_names(self) -> list[str]:
        return list(ROTATION_SCANS) if self.protocol == "rotation" else sim_trajectory.sweep_scan_names()


PRESETS = {
    # The 2025 challenge: 2 rotation scans per subject, ~1500 frames, 100 landmarks.
    "tusrec2025": Preset(reason="TUS-REC 2025 train set shape"),
    # The 2024 challenge: 24 sweeps per subject of natural length, 20 landmarks.
    "tusrec2024": Preset(protocol="sweeps", frames=None, landmarks=20, reason="TUS-REC 2024 train set shape"),
    # `make demo` generates, trains and evaluates in ~10 min on 2 cores: few short scans, lower density
    # (measured: ~1 min to generate on 2 shared cores, 0.7 GB on disk; 240x320 would quarter both).
    "demo": Preset(subjects=6, frames=200, landmarks=20, density=5.0, reason="demo in minutes on 2 cores"),
    # Tests: 120x160 frames, 64 lines, low density, coarse medium: ~3 s to generate, 1.9 MB.
    "tiny": Preset(subjects=2, frames=24, height=120, width=160, landmarks=10, num_lines=64, num_samples=200,
                   density=2.0, medium_spacing=2.0, reason="unit tests"),
}


def get_preset(name: str, **overrides) -> Preset:
    """The preset ``name`` with ``overrides`` (None values ignored), validated.

    Raises ValueError for an unknown preset or field, listing the allowed ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(Preset)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown preset field(s) {unknown}; expected some of {sorted(fields)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[name], **given).validate()


def scaled_calibration(height: int, width: int, calibration=None):
    """``(S, C)`` float64 [4, 4]: the calibration with the pixel size scaled so H x W spans the real field of view."""
    calibration = calibration or default_calibration()
    scale = np.array(calibration.scale, dtype=np.float64)
    scale[0, 0] *= REFERENCE_SIZE[1] / width
    scale[1, 1] *= REFERENCE_SIZE[0] / height
    return scale, np.array(calibration.calib_R_T, dtype=np.float64)


def make_geometry(preset: Preset, scale: np.ndarray) -> ImageGeometry:
    """The probe and image geometry of a preset (the probe's physical size never changes)."""
    probe = CurvilinearProbe(num_lines=preset.num_lines, num_samples=preset.num_samples)
    return ImageGeometry(probe, preset.height, preset.width, (float(scale[0, 0]), float(scale[1, 1])))


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, key)]))


def random_camera_pose(rng: np.random.Generator) -> np.ndarray:
    """A rigid ``T_cam<-tissue`` float64 [4, 4]: uniform random rotation, camera 0.8-1.5 m away."""
    from scipy.spatial.transform import Rotation

    tform = np.eye(4)
    tform[:3, :3] = Rotation.random(random_state=rng).as_matrix()
    tform[:3, 3] = [rng.uniform(-200, 200), rng.uniform(-200, 200), -rng.uniform(800, 1500)]
    return tform


# --------------------------------------------------------------------------------------------
# Rendering in worker processes
# --------------------------------------------------------------------------------------------

# The renderer of the scan being rendered: set before the pool forks so workers share it (and its
# scatterers) copy-on-write instead of receiving a pickled copy.
_WORKER_RENDERER = None
_WORKER_RENDERER_SHAPE = (0, 0)  # (H, W) of its frames


def _limit_threads() -> None:
    """One thread per worker: parallelism comes from processes (numba threading made a gather 25x slower).

    Also gives SIGTERM back its default action: the pool stops its workers with it, and a forked
    worker would otherwise inherit the script's handler (``utils.cli.run_cli``) and print a traceback.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # For libraries a worker loads after the fork. Not NUMBA_NUM_THREADS: numba re-reads its
    # environment when it compiles and refuses a change once its pool exists; set_num_threads below.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    if "numba" in sys.modules:
        try:
            sys.modules["numba"].set_num_threads(1)
        except (ValueError, RuntimeError):  # numba's threading layer not initialised: nothing to limit
            pass


def _render_chunk(task):
    start, poses, seeds = task
    out = np.empty((len(poses), *_WORKER_RENDERER_SHAPE), dtype=np.uint8)
    for k, (pose, seed) in enumerate(zip(poses, seeds)):
        out[k] = _WORKER_RENDERER.render(pose, int(seed))
    return start, out


def render_frames(renderer, poses: np.ndarray, noise_seeds: np.ndarray, shape: tuple, workers: int = 1,
                  progress=None, chunk: int = 4) -> np.ndarray:
    """Render every pose: uint8 [N, H, W].

    Args:
        renderer: has ``render(tform_tissue_from_image [4, 4], noise_seed) -> uint8 [H, W]``.
        poses: float64 [N, 4, 4]; noise_seeds: int [N].
        shape: (H, W).
        workers: processes; 1 renders here. More fork this process (so the renderer is shared, not
            copied) with one compute thread each.
        progress: a tqdm-like object with ``update(n)``, or None.
    The result does not depend on ``workers``: each frame's noise comes from its own seed.
    """
    global _WORKER_RENDERER, _WORKER_RENDERER_SHAPE
    num = len(poses)
    frames = np.empty((num, *shape), dtype=np.uint8)
    if workers <= 1 or num <= chunk:
        for k in range(num):
            frames[k] = renderer.render(poses[k], int(noise_seeds[k]))
            if progress is not None:
                progress.update(1)
        return frames
    # The first frame here: compiles (or loads) the renderer's kernels once, before the fork, instead
    # of once per worker.
    frames[0] = renderer.render(poses[0], int(noise_seeds[0]))
    if progress is not None:
        progress.update(1)
    tasks = [(s, poses[s:s + chunk], noise_seeds[s:s + chunk]) for s in range(1, num, chunk)]
    _WORKER_RENDERER, _WORKER_RENDERER_SHAPE = renderer, tuple(shape)
    try:
        context = multiprocessing.get_context("fork")
        with context.Pool(workers, initializer=_limit_threads) as pool:
            for start, block in pool.imap_unordered(_render_chunk, tasks):
                frames[start:start + len(block)] = block
                if progress is not None:
                    progress.update(len(block))
    finally:
        _WORKER_RENDERER = None
    return frames


# --------------------------------------------------------------------------------------------
# Phantom and renderer construction (the real modules by default; tests may pass stand-ins)
# --------------------------------------------------------------------------------------------


def default_phantom_factory(rng: np.random.Generator, side: str):
    """``ForearmPhantom(sample_parameters(rng, "L" | "R"))`` from ``simulation.phantom`` for arm ``"LH"``/``"RH"``."""
    from simulation import phantom

    return phantom.ForearmPhantom(phantom.sample_parameters(rng, side[0]))


def default_renderer_factory(geometry, scatterers, medium, density: float):
    """``simulation.imaging.Renderer`` with default settings but the reference density.

    The reference density is set to the preset's: a fast preset's lower density is a speed
    compromise, not a darker tissue, so its grey levels stay those of the default.
    """
    from simulation import imaging

    # entry_echo_db: the skin entry line of real frames (see RenderSettings), a little over the skin (+6 dB)
    settings = imaging.RenderSettings(reference_density_per_mm3=float(density), entry_echo_db=8.0)
    return imaging.Renderer(geometry, scatterers, medium, settings)


def _phantom_dict(phantom) -> dict:
    params = getattr(phantom, "params", None) or getattr(phantom, "parameters", None)
    if params is not None and hasattr(params, "to_dict"):
        return params.to_dict()
    return {}


def _label_categories(phantom) -> dict | None:
    """``{label code: landmark category}`` for ``simulation.phantom.Label`` classes (None for stand-ins)."""
    getter = getattr(phantom, "label_categories", None)
    if callable(getter):
        return getter()
    try:
        from simulation.phantom import ForearmPhantom, Label
    except ImportError:
        return None
    if not isinstance(phantom, ForearmPhantom):
        return None
    return {int(Label.BONE): "bone", int(Label.FASCIA): "fascia", int(Label.SEPTUM): "fascia",
            int(Label.VESSEL): "vessel", int(Label.SKIN): "skin", int(Label.FAT): "skin"}


def _arm_x_range(phantom) -> tuple:
    """The phantom's X range along the forearm (elbow at X = 0), mm."""
    params = getattr(phantom, "params", None)
    length = getattr(params, "length_mm", None)
    return (0.0, float(length)) if length is not None else (0.0, 250.0)


def _half_width(phantom):
    """``X -> half-width (mm)`` of the phantom's elliptical cross-section (linear taper), or None."""
    params = getattr(phantom, "params", None)
    if params is None or not hasattr(params, "half_width_mm") or not hasattr(params, "taper_per_100mm"):
        return None
    return lambda x: params.half_width_mm * (1 - params.taper_per_100mm / 100 * np.asarray(x, dtype=np.float64))


def _medium(phantom, region, spacing):
    """The phantom's attenuation medium on ``spacing`` mm voxels, restricted to ``region`` (memory, time)."""
    try:
        return phantom.medium(spacing=spacing, region=region)
    except TypeError:  # a stand-in without the keywords
        return phantom.medium()


def _scan_region(trajectories, geometry, margin_mm: float = 10.0) -> np.ndarray:
    """[[x0, y0, z0], [x1, y1, z1]] tissue mm box holding every frame's sector (plus a margin)."""
    height, width = geometry.height, geometry.width
    sx, sy = geometry.pixel_mm
    corners = np.array([[1, 1], [width, 1], [1, height], [width, height], [(width + 1) / 2, height]], dtype=np.float64)
    pts = np.stack([corners[:, 0] * sx, corners[:, 1] * sy, np.zeros(len(corners)), np.ones(len(corners))])
    low, high = np.full(3, np.inf), np.full(3, -np.inf)
    for traj in trajectories:
        tissue = np.einsum("nij,jk->nik", traj.tform_tissue_from_image, pts)[:, :3]
        low = np.minimum(low, tissue.min(axis=(0, 2)))
        high = np.maximum(high, tissue.max(axis=(0, 2)))
    # The elevational beam reaches a few mm off the plane.
    return np.stack([low - margin_mm, high + margin_mm])


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def write_side_file(path, datasets: dict, texts: dict) -> Path:
    """Write the side-data HDF5 (module docstring): arrays as datasets, dicts as JSON bytes."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with writing_hdf5(tmp) as handle:
            for key, value in datasets.items():
                handle.create_dataset(key, data=value)
            for key, value in texts.items():
                handle.create_dataset(key, data=np.bytes_(json.dumps(value, sort_keys=True, default=_json_default)))
    return path


def read_side_file(path) -> dict:
    """The side data of one scan as a dict of numpy arrays and decoded JSON dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"simulation side file not found: {path}")
    out = {}
    with h5py.File(path, "r") as handle:
        for key, dataset in handle.items():
            value = dataset[()]
            if isinstance(value, bytes):
                value = json.loads(value.decode()) if key != "landmark_kinds" else value
            out[key] = value
    if "landmark_kinds" in out:
        out["landmark_kinds"] = [k.decode() if isinstance(k, bytes) else str(k) for k in out["landmark_kinds"]]
    return out


def side_file_path(root, subject: int, scan_name: str) -> Path:
    return Path(root) / SIDE_FOLDER / subject_folder(subject) / f"{scan_name}.h5"


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def make_trajectory(rng, phantom, geometry, preset: Preset, scan_name: str, habit_rng=None):
    """The trajectory of one scan (rotation or the sweep its name encodes); ``habit_rng`` draws the
    rotation protocol's habitual directions (needed when ``preset.habit`` is not 0.5)."""
    x_range = _arm_x_range(phantom)
    if preset.protocol == "rotation":
        start_x = tuple(x_range[0] + np.asarray(sim_trajectory.ROTATION_START_X_MM))  # proximal forearm
        return sim_trajectory.rotation_protocol(rng, phantom.skin_surface, geometry, preset.frames, start_x_mm=start_x,
                                                habit=float(preset.habit), habit_rng=habit_rng)
    return sim_trajectory.sweep_protocol(rng, phantom.skin_surface, geometry, scan_name, preset.frames, arm_x_mm=x_range,
                                         half_width_mm=_half_width(phantom))


def generate_dataset(root, preset: str | Preset = "tiny", seed: int = 0, layout: str = LAYOUT_TRAIN,
                     workers: int = 1, progress: bool = False, calibration=None,
                     phantom_factory=None, renderer_factory=None, **overrides) -> list[ScanRef]:
    """Write a synthetic dataset under ``root`` and return its scans.

    Args:
        root: dataset root (created); files already there with the same names are replaced, so
            callers decide whether a non-empty root is acceptable (``simulate.py`` refuses it).
        preset: a name in ``PRESETS`` or a ``Preset``.
        seed: everything drawn follows from it.
        layout: ``"train"`` or ``"test"`` (DESIGN.md section 3).
        workers: render processes (see ``render_frames``).
        progress: show a tqdm bar over frames.
        calibration: a ``utils.calibration.Calibration`` (default: the real one); its ``S`` is scaled
            for reduced frame sizes.
        phantom_factory: ``(rng, side "LH"/"RH") -> phantom`` (default ``default_phantom_factory``).
        renderer_factory: ``(geometry, scatterers, medium, density) -> renderer`` (default the real one).
        overrides: Preset fields (``subjects``, ``frames``, ``height``, ``width``, ``protocol``, ...).
    Returns:
        list of ``ScanRef`` in writing order.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {list(LAYOUTS)}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: expected an integer >= 1")
    if isinstance(preset, str):
        preset_name, preset = preset, get_preset(preset, **overrides)
    else:
        preset_name, preset = "custom", dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None}).validate()
    phantom_factory = phantom_factory or default_phantom_factory
    renderer_factory = renderer_factory or default_renderer_factory
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    scale, calib_r_t = scaled_calibration(preset.height, preset.width, calibration)
    write_calib_matrices(root / CALIB_FILE, scale, calib_r_t)
    geometry = make_geometry(preset, scale)
    sector = geometry.sector_mask()
    calib_inverse = np.linalg.inv(calib_r_t)
    # Labels on every pixel at small sizes; every other pixel at full size (a quarter of the lookups).
    stride = 1 if preset.height * preset.width <= 160 * 240 else 2

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="frame", desc="simulate", dynamic_ncols=True)
    refs, keys = [], []
    scan_names = preset.scan_names()
    total_scans = preset.subjects * len(scan_names)
    generation_start = time.perf_counter()
    try:
        for subject in range(preset.subjects):
            subject_landmarks = {}
            for arm_index, side in enumerate(("LH", "RH")):
                names = [n for n in scan_names if n.startswith(side)]
                if not names:
                    continue
                # The same stream for both arms: a phantom draws the subject's shared anatomy first,
                # then the arm's own asymmetry, so left and right arms of a subject stay alike.
                phantom = phantom_factory(_rng(seed, subject, _PHANTOM), side)
                scan_ids = [scan_names.index(n) for n in names]
                trajectories = [make_trajectory(_rng(seed, subject, _TRAJECTORY, i), phantom, geometry, preset, n,
                                                habit_rng=_rng(seed, subject, _HABIT, i))
                                for i, n in zip(scan_ids, names)]
                if bar is not None:
                    bar.total += sum(len(t) for t in trajectories)
                    bar.refresh()
                started = time.perf_counter()
                region = _scan_region(trajectories, geometry)
                scatterers = phantom.make_scatterers(preset.density, _rng(seed, subject, _SCATTERERS, arm_index),
                                                     region=region)
                renderer = renderer_factory(geometry, scatterers, _medium(phantom, region, preset.medium_spacing),
                                            preset.density)
                logger.info("%s %s: phantom, %.2f M scatterers and medium in %.1f s", subject_folder(subject), side,
                            len(scatterers) / 1e6, time.perf_counter() - started)
                for scan_id, name, traj in zip(scan_ids, names, trajectories):
                    if bar is not None:
                        bar.set_description(f"{subject_folder(subject)}/{name}")
                    poses = traj.tform_tissue_from_image
                    noise_seeds = _rng(seed, subject, _NOISE, scan_id).integers(0, 2**31 - 1, size=len(poses))
                    started = time.perf_counter()
                    frames = render_frames(renderer, poses, noise_seeds, (preset.height, preset.width), workers, bar)
                    rendered = time.perf_counter()
                    landmarks, points, kinds = sim_landmarks.select_landmarks(
                        _rng(seed, subject, _LANDMARKS, scan_id), frames, poses, phantom.labels, scale, sector,
                        preset.landmarks, stride=stride, label_categories=_label_categories(phantom))
                    chosen = time.perf_counter()
                    camera = random_camera_pose(_rng(seed, subject, _CAMERA, scan_id))
                    tforms = camera @ poses @ calib_inverse
                    refs.append(write_scan(root, subject, name, frames, tforms, layout=layout))
                    keys.append(dataset_key(subject_folder(subject), name))
                    subject_landmarks[name] = landmarks
                    write_side_file(
                        side_file_path(root, subject, name),
                        {"tform_camera_from_tissue": camera, "tform_tissue_from_image": poses,
                         "tform_tissue_from_probe": traj.tform_tissue_from_probe, "landmarks": landmarks,
                         "landmark_points": points, "landmark_kinds": np.array(kinds, dtype="S"),
                         "noise_seeds": noise_seeds.astype(np.int64)},
                        {"phantom_parameters": _phantom_dict(phantom),
                         "trajectory": {k: v for k, v in traj.meta.items() if not isinstance(v, np.ndarray)},
                         "generator": {"preset": preset_name, **dataclasses.asdict(preset), "seed": seed,
                                       "subject": subject, "arm": side, "scan": name}},
                    )
                    del frames
                    done = time.perf_counter()
                    scans_done = len(refs)
                    eta = (done - generation_start) / scans_done * (total_scans - scans_done)
                    logger.info("[%d/%d] %s/%s: %d frames rendered in %.1f s (%.1f frames/s), landmarks %.1f s, "
                                "written %.1f s; ETA %.0f s", scans_done, total_scans, subject_folder(subject), name,
                                len(poses), rendered - started, len(poses) / max(rendered - started, 1e-9),
                                chosen - rendered, done - chosen, eta)
                del renderer, scatterers
            write_landmarks(root, subject, subject_landmarks)
        if layout == LAYOUT_TEST:
            write_dataset_keys(root, keys)
    finally:
        if bar is not None:
            bar.close()
    # The landmark file of a subject is written after its scans: refresh the refs' landmark paths.
    return [dataclasses.replace(ref, landmark_path=root / "landmarks" / f"landmark_{ref.subject:03d}.h5") for ref in refs]
