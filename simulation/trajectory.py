"""Freehand probe trajectories on a phantom's skin: the 2025 rotation protocol and the 2024 sweeps.

A trajectory is the pose of the image plane in the tissue frame for every frame,
``T_tissue<-image_mm`` (float64 [N, 4, 4], mm), sampled at ``FPS`` = 20 frames per second like the
challenge scans. It is built from the pose of the probe frame (``CurvilinearProbe``: apex origin, x
lateral, y elevational, z along the beam), ``T_tissue<-probe``, and the fixed
``ImageGeometry.tform_probe_to_image_mm()``: ``T_tissue<-image_mm = T_tissue<-probe . T_image_mm<-probe^-1``.

Building blocks (SIMULATOR.md, "Trajectories"):

- ``minimum_jerk``: ``q0 + (q1 - q0) (10 s^3 - 15 s^4 + 6 s^5)`` between knots, the smooth
  point-to-point motion of a human hand;
- ``ou_drift``: Ornstein-Uhlenbeck drift on the 6 degrees of freedom (0.5-1.5 mm, 1-2 degrees RMS,
  time constant 1-3 s), lightly smoothed, the slow wander of an operator's hand;
- ``tremor``: a sum of sinusoids with frequencies in 8-12 Hz (physiological tremor), 0.02-0.1 mm and
  0.05-0.2 degrees RMS, evaluated at the frame times: at 20 fps it aliases, as in real scans;
- ``place_on_skin``: the convex face is put on the skin: the point of the face whose normal opposes
  the skin normal is placed on the skin point below the target contact position (``skin_surface``),
  pressed in by the indentation (0-3 mm). Rocking therefore rolls the face over the skin and the
  contact point always lies on the skin.

The protocols compose these: ``rotation_protocol`` (fan, rock, rotate ~90 degrees, fan, rock, with
pauses, about a fixed contact point near the elbow) and ``sweep_protocol`` (a line, C or S path
along the forearm, probe parallel or perpendicular to the path, distal to proximal or back).

``skin_surface(x, y) -> (points [N, 3], outward normals [N, 3])`` is the phantom's method; it is
called with arrays (a scalar-only implementation is looped over, see ``vectorized_skin``).
Everything here is deterministic for a ``numpy.random.Generator`` and does no work at import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.spatial.transform import Rotation

FPS = 20.0  # frames per second of the challenge scans

# Named ranges of SIMULATOR.md ("Trajectories"); tests check the protocols against them.
DRIFT_MM = (0.5, 1.5)
DRIFT_DEG = (1.0, 2.0)
DRIFT_TAU_S = (1.0, 3.0)
TREMOR_HZ = (8.0, 12.0)
TREMOR_MM = (0.02, 0.1)
TREMOR_DEG = (0.05, 0.2)
INDENTATION_MM = (0.0, 3.0)
FAN_DEG = (15.0, 30.0)
FAN_HALF_CYCLE_S = (1.2, 2.5)
FAN_PEAK_DEG_S = (20.0, 60.0)
FAN_CYCLES = (2, 4)
ROCK_DEG = (8.0, 20.0)
ROCK_HALF_CYCLE_S = (1.0, 2.0)
ROTATE_DEG = (80.0, 100.0)
ROTATE_S = (1.5, 3.0)
PAUSE_S = (0.3, 1.0)
# A sonographer's habit: the direction each fan and each rock starts in, and the sense of the quarter
# turn, in the probe's own frame (one hand holds the probe the same way on every scan). The challenge
# fixes the order of the moves (fan, rock, rotate ~90 degrees, fan, rock; TUS-REC 2025 data page) but
# not their directions, so by default (HABIT_NONE) every direction is drawn at random; ``habit`` is
# the probability that a move goes the habitual way (README, "Simulated data": direction cues).
HABITUAL_SIGN = {"fan": 1.0, "rock": 1.0, "rotate": 1.0}
HABIT_NONE = 0.5
SWEEP_LENGTH_MM = (100.0, 180.0)
SWEEP_SPEED_MM_S = (5.0, 15.0)
SWEEP_SPEED_MODULATION = 0.3
SWEEP_AMPLITUDE_MM = (10.0, 25.0)
SWEEP_TILT_DEG = 10.0
SWEEP_MAX_LATERAL_FRACTION = 0.45  # of the arm's local half-width
SWEEP_PATHS = ("L", "C", "S")
SWEEP_ORIENTATIONS = ("Par", "Per")
SWEEP_DIRECTIONS = ("DtP", "PtD")
ARMS = ("LH", "RH")
# The phantom stops at the elbow crease (X = 0). A longitudinal sector reaches ~55 mm along the arm
# at the bones' depth and the protocol turns every plane longitudinal at some point, so the contact
# starts 65-90 mm distal to the crease: "near the elbow" without imaging the phantom's cut end.
ROTATION_START_X_MM = (65.0, 90.0)
# How far a sweep keeps from the phantom's ends: enough for a longitudinal (Par) sector where the
# arm is long enough, at least 10 mm.
SWEEP_END_MARGIN_MM = (10.0, 50.0)


def sweep_scan_names() -> list[str]:
    """The 24 scan names of a 2024 subject, ``{LH,RH}_{Par,Per}_{L,C,S}_{DtP,PtD}``, in a fixed order."""
    return [f"{a}_{o}_{p}_{d}" for a in ARMS for o in SWEEP_ORIENTATIONS for p in SWEEP_PATHS for d in SWEEP_DIRECTIONS]


def parse_sweep_name(name: str) -> tuple[str, str, str, str]:
    """``"LH_Per_C_DtP" -> ("LH", "Per", "C", "DtP")``; ValueError naming the name otherwise."""
    parts = name.split("_")
    if (len(parts) != 4 or parts[0] not in ARMS or parts[1] not in SWEEP_ORIENTATIONS
            or parts[2] not in SWEEP_PATHS or parts[3] not in SWEEP_DIRECTIONS):
        raise ValueError(f"sweep scan name {name!r} is not of the form {{LH,RH}}_{{Par,Per}}_{{L,C,S}}_{{DtP,PtD}}")
    return parts[0], parts[1], parts[2], parts[3]


@dataclass
class Trajectory:
    """A probe trajectory sampled at ``FPS``.

    Attributes:
        tform_tissue_from_image: float64 [N, 4, 4], image mm -> tissue mm (what the renderer takes).
        tform_tissue_from_probe: float64 [N, 4, 4], probe frame -> tissue mm.
        skin_points: float64 [N, 3], the skin point under the face (before indentation), tissue mm.
        face_points: float64 [N, 3], the point of the convex face pressed into the skin, tissue mm
            (``skin_points - indentation * normal``).
        indentation_mm: float64 [N].
        meta: protocol values for inspection and tests (angles in degrees per frame, speeds...).
    """

    tform_tissue_from_image: np.ndarray
    tform_tissue_from_probe: np.ndarray
    skin_points: np.ndarray
    face_points: np.ndarray
    indentation_mm: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tform_tissue_from_image.shape[0])


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def minimum_jerk_profile(s):
    """``10 s^3 - 15 s^4 + 6 s^5`` for s clipped to [0, 1]: 0 -> 1 with zero velocity and acceleration at both ends."""
    s = np.clip(np.asarray(s, dtype=np.float64), 0.0, 1.0)
    return s**3 * (10.0 - 15.0 * s + 6.0 * s * s)


def minimum_jerk(times, knot_times, knot_values) -> np.ndarray:
    """Piecewise minimum-jerk motion through knots, evaluated at ``times`` (s).

    Args:
        times: [T] seconds.
        knot_times: [K] strictly increasing seconds.
        knot_values: [K, D] positions at the knots.
    Returns:
        float64 [T, D]: held at the first value before ``knot_times[0]`` and at the last after the end.
    """
    times = np.asarray(times, dtype=np.float64)
    knot_times = np.asarray(knot_times, dtype=np.float64)
    values = np.asarray(knot_values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if knot_times.ndim != 1 or len(knot_times) != len(values) or len(knot_times) < 1:
        raise ValueError(f"knot_times {knot_times.shape} and knot_values {values.shape} must have the same length >= 1")
    if np.any(np.diff(knot_times) <= 0):
        raise ValueError(f"knot_times must be strictly increasing, got {knot_times.tolist()}")
    segment = np.clip(np.searchsorted(knot_times, times, side="right") - 1, 0, max(len(knot_times) - 2, 0))
    if len(knot_times) == 1:
        return np.repeat(values[:1], len(times), axis=0)
    t0, t1 = knot_times[segment], knot_times[segment + 1]
    s = minimum_jerk_profile((times - t0) / (t1 - t0))
    return values[segment] + (values[segment + 1] - values[segment]) * s[:, None]


def ou_drift(rng: np.random.Generator, num_frames: int, sigma, tau_s, fps: float = FPS, smooth_s: float = 0.2):
    """Stationary Ornstein-Uhlenbeck processes with RMS ``sigma`` and time constant ``tau_s``.

    Args:
        sigma, tau_s: [D] (or scalars) stationary standard deviation and correlation time (s).
        smooth_s: a Gaussian smoothing (standard deviation in s) after the exact discrete OU
            recursion: a raw OU path is rough at the frame scale (its increments grow as
            sqrt(dt)), which a hand's drift is not; the result is rescaled back to ``sigma``.
    Returns:
        float64 [num_frames, D].
    """
    sigma = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    tau = np.broadcast_to(np.atleast_1d(np.asarray(tau_s, dtype=np.float64)), sigma.shape)
    dt = 1.0 / fps
    decay = np.exp(-dt / tau)
    # Start at a draw of the stationary law and extend by half a minute of burn-out margin for the
    # smoothing at both ends.
    pad = int(math.ceil(3 * smooth_s * fps)) + 1
    total = num_frames + 2 * pad
    noise = rng.standard_normal((total, sigma.size))
    path = np.empty((total, sigma.size))
    path[0] = noise[0]
    innovation = np.sqrt(1.0 - decay**2)
    for k in range(1, total):
        path[k] = decay * path[k - 1] + innovation * noise[k]
    if smooth_s > 0:
        path = gaussian_filter1d(path, smooth_s * fps, axis=0, mode="nearest")
        # Smoothing shrinks the variance; restore the stationary RMS of the unit process (exactly 1
        # in expectation) from the known lag-correlation rather than the sample, so short paths are
        # not inflated.
        path /= np.sqrt(_smoothed_ou_variance(decay, smooth_s * fps))
    return path[pad:pad + num_frames] * sigma


def _smoothed_ou_variance(decay: np.ndarray, sigma_frames: float) -> np.ndarray:
    """Variance of a unit-variance discrete OU (lag correlation ``decay^|k|``) after a Gaussian filter."""
    radius = int(4 * sigma_frames + 0.5)
    lags = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (lags / sigma_frames) ** 2)
    kernel /= kernel.sum()
    diff = lags[:, None] - lags[None, :]
    return np.array([kernel @ (d ** np.abs(diff)) @ kernel for d in np.atleast_1d(decay)])


@dataclass(frozen=True)
class Tremor:
    """Physiological tremor on 6 DOF: a sum of sinusoids in ``TREMOR_HZ``, a continuous-time signal.

    Attributes:
        frequencies_hz, amplitudes, phases: [D, M] per degree of freedom and component.
    ``__call__(times)`` evaluates it at any times, so tests can sample it densely (unaliased) while the
    trajectory samples it at 20 fps (aliased, as a real tracker at the frame rate sees it).
    """

    frequencies_hz: np.ndarray
    amplitudes: np.ndarray
    phases: np.ndarray

    def __call__(self, times) -> np.ndarray:
        times = np.asarray(times, dtype=np.float64)
        arg = 2 * np.pi * self.frequencies_hz[None] * times[:, None, None] + self.phases[None]
        return (self.amplitudes[None] * np.sin(arg)).sum(axis=-1)

    def rms(self) -> np.ndarray:
        """[D] RMS of the continuous signal (components at distinct frequencies add in power)."""
        return np.sqrt((self.amplitudes**2).sum(axis=-1) / 2)


def sample_tremor(rng: np.random.Generator, rms_mm: float | None = None, rms_deg: float | None = None,
                  components: int = 12) -> Tremor:
    """A random ``Tremor`` on ``[tx, ty, tz] mm, [rx, ry, rz] deg`` with the given (or drawn) RMS."""
    rms_mm = rng.uniform(*TREMOR_MM) if rms_mm is None else rms_mm
    rms_deg = rng.uniform(*TREMOR_DEG) if rms_deg is None else rms_deg
    freqs = rng.uniform(*TREMOR_HZ, size=(6, components))
    weights = rng.uniform(0.5, 1.0, size=(6, components))
    # Split the total RMS between translations (and between rotations) as the per-axis RMS squared.
    per_axis = np.array([rms_mm] * 3 + [rms_deg] * 3) / np.sqrt(3)
    amplitudes = weights * (per_axis * np.sqrt(2) / np.sqrt((weights**2).sum(axis=1)))[:, None]
    phases = rng.uniform(0, 2 * np.pi, size=(6, components))
    return Tremor(freqs, amplitudes, phases)


def vectorized_skin(skin_surface):
    """Wrap ``skin_surface(x, y)`` so it takes arrays [N] and returns float64 ([N, 3], [N, 3])."""
    def call(x, y):
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        try:
            points, normals = skin_surface(x, y)
            points, normals = np.asarray(points, np.float64), np.asarray(normals, np.float64)
            vectorised = points.shape == (x.size, 3) and normals.shape == (x.size, 3)
        except TypeError:  # a scalar-only implementation (a ValueError, e.g. off the arm, propagates)
            vectorised = False
        if not vectorised:
            pairs = [skin_surface(float(a), float(b)) for a, b in zip(x, y)]
            points = np.array([np.asarray(p, np.float64).reshape(3) for p, _ in pairs])
            normals = np.array([np.asarray(n, np.float64).reshape(3) for _, n in pairs])
        normals = normals / np.linalg.norm(normals, axis=1, keepdims=True)
        return points, normals
    return call


def place_on_skin(skin_surface, xy, rotation, indentation_mm, radius_mm: float, half_fov_rad: float):
    """Probe poses with the convex face on the skin.

    Args:
        skin_surface: as in the module docstring (``vectorized_skin`` is applied).
        xy: [N, 2] tissue (X, Y) of the intended contact, mm.
        rotation: [N, 3, 3] probe orientation in the tissue frame (columns: lateral, elevational, beam).
        indentation_mm: [N] how far the face presses into the skin along the inward normal.
        radius_mm, half_fov_rad: the convex face (the probe's radius and half opening).
    Returns:
        ``(tform_tissue_from_probe [N, 4, 4], skin_points [N, 3], face_points [N, 3])`` float64.

    The face point that touches is the one whose outward normal (from the apex) is anti-parallel to
    the skin's outward normal, projected into the imaging (x-z) plane because the face is curved only
    there; it stays within the face's angular extent.
    """
    skin = vectorized_skin(skin_surface)
    points, normals = skin(xy[:, 0], xy[:, 1])
    inward_probe = np.einsum("nji,nj->ni", rotation, -normals)  # R^T (-n): inward normal, probe frame
    angle = np.clip(np.arctan2(inward_probe[:, 0], inward_probe[:, 2]), -half_fov_rad, half_fov_rad)
    face_probe = radius_mm * np.stack([np.sin(angle), np.zeros_like(angle), np.cos(angle)], axis=1)
    face_points = points - np.asarray(indentation_mm, np.float64)[:, None] * normals
    tform = np.zeros((len(xy), 4, 4))
    tform[:, :3, :3] = rotation
    tform[:, :3, 3] = face_points - np.einsum("nij,nj->ni", rotation, face_probe)
    tform[:, 3, 3] = 1.0
    return tform, points, face_points


def image_poses(tform_tissue_from_probe: np.ndarray, geometry) -> np.ndarray:
    """``T_tissue<-image_mm = T_tissue<-probe . T_image_mm<-probe^-1`` for an ``ImageGeometry``."""
    probe_from_image = np.linalg.inv(geometry.tform_probe_to_image_mm())
    return tform_tissue_from_probe @ probe_from_image


def _frame_from_normal(normal: np.ndarray, lateral_hint: np.ndarray) -> np.ndarray:
    """[N, 3, 3] orientations: beam along -normal, lateral along the hint projected on the skin plane."""
    z = -normal
    x = lateral_hint - (lateral_hint * z).sum(-1, keepdims=True) * z
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y = np.cross(z, x)  # right-handed: x cross y = z
    return np.stack([x, y, z], axis=-1)


def _perturbations(rng, num_frames, fps):
    """Smoothed OU drift and 20-fps tremor on 6 DOF: ``([N, 3] mm, [N, 3] deg, settings dict)``."""
    drift_mm, drift_deg = rng.uniform(*DRIFT_MM), rng.uniform(*DRIFT_DEG)
    tau = rng.uniform(*DRIFT_TAU_S, size=6)
    # Per-axis sigma so that the 3D RMS of each triple is the drawn value.
    sigma = np.array([drift_mm] * 3 + [drift_deg] * 3) / np.sqrt(3)
    drift = ou_drift(rng, num_frames, sigma, tau, fps)
    tremor = sample_tremor(rng)
    shake = tremor(np.arange(num_frames) / fps)
    total = drift + shake
    settings = {"drift_rms_mm": drift_mm, "drift_rms_deg": drift_deg, "drift_tau_s": tau.tolist(),
                "tremor_rms": tremor.rms().tolist()}
    return total[:, :3], total[:, 3:], settings, tremor


def _assemble(geometry, skin_surface, xy, rotation, indentation, meta):
    probe = geometry.probe
    tform_probe, points, face = place_on_skin(skin_surface, xy, rotation, indentation, probe.radius_mm,
                                              probe.half_fov_rad)
    return Trajectory(image_poses(tform_probe, geometry), tform_probe, points, face, indentation, meta)


# --------------------------------------------------------------------------------------------
# 2025 rotation protocol
# --------------------------------------------------------------------------------------------


def _direction(rng, move: str, habit: float, habit_rng) -> float:
    """+1 or -1: the way a fan, rock or rotation (``move``) goes.

    The draw from ``rng`` is made whatever the habit, so a habit changes the directions of a
    trajectory and nothing else (same amplitudes, timings, drift and tremor); with a habit other
    than ``HABIT_NONE`` the direction is the habitual one with probability ``habit``, decided by
    ``habit_rng``.
    """
    sign = float(rng.choice([-1.0, 1.0]))
    if habit == HABIT_NONE:
        return sign
    if habit_rng is None:
        raise ValueError(f"habit={habit} needs a habit_rng for its draws")
    habitual = HABITUAL_SIGN[move]
    return habitual if habit_rng.random() < habit else -habitual


def _swing_block(rng, knots, channel, amplitude, half_cycle, cycles, sign, half_cycle_bounds=None):
    """Append minimum-jerk swings 0 -> +-A -> -+A ... -> 0 on ``channel`` to ``knots`` (time, [3] values).

    Each full swing lasts ``half_cycle`` with +-5 % jitter, clipped to ``half_cycle_bounds`` (s) when
    given; the first and last moves cover half a swing in half the time, at the same peak speed.
    ``sign`` (+1 or -1, from ``_direction``) is the first swing's direction.
    """
    t, values = knots[-1]
    targets = [sign * amplitude]
    for _ in range(2 * cycles - 1):
        targets.append(-targets[-1])
    targets.append(0.0)
    for k, target in enumerate(targets):
        duration = half_cycle * rng.uniform(0.95, 1.05)
        if half_cycle_bounds is not None:
            duration = float(np.clip(duration, *half_cycle_bounds))
        if k in (0, len(targets) - 1):
            duration *= 0.5
        values = values.copy()
        values[channel] = target
        t += duration
        knots.append((t, values))


def _pause(rng, knots):
    t, values = knots[-1]
    knots.append((t + rng.uniform(*PAUSE_S), values.copy()))


def rotation_schedule(rng: np.random.Generator, duration_s: float, habit: float = HABIT_NONE, habit_rng=None):
    """Knots ``[(time s, [fan, rock, spin] deg)]`` of the rotation protocol lasting at least ``duration_s``.

    Fan (about the lateral axis): +-15-30 degrees, 2-4 cycles, half-cycles 1.2-2.5 s with the peak
    speed (1.875 x swing / half-cycle for a minimum-jerk move) kept in 20-60 degrees/s; rock (about the
    elevational axis): +-8-20 degrees, 1-2 s half-cycles; rotate 80-100 degrees about the probe axis
    over 1.5-3 s; pauses of 0.3-1 s between the moves. After fan, rock, rotate, fan, rock, further
    fan/rock blocks follow until the scan is long enough. ``habit``: the probability that each fan,
    rock and rotation goes the habitual way (``HABITUAL_SIGN``), drawn with ``habit_rng``.
    """
    if not 0.0 <= habit <= 1.0:
        raise ValueError(f"habit={habit!r}: expected a probability in [0, 1] ({HABIT_NONE}: no habit)")
    knots = [(0.0, np.zeros(3))]

    def fan():
        amplitude = rng.uniform(*FAN_DEG)
        # Half-cycle such that the peak speed 1.875 * 2A / T stays within FAN_PEAK_DEG_S.
        low = max(FAN_HALF_CYCLE_S[0], 1.875 * 2 * amplitude / FAN_PEAK_DEG_S[1])
        high = min(FAN_HALF_CYCLE_S[1], 1.875 * 2 * amplitude / FAN_PEAK_DEG_S[0])
        half_cycle, cycles = rng.uniform(low, high), int(rng.integers(FAN_CYCLES[0], FAN_CYCLES[1] + 1))
        _swing_block(rng, knots, 0, amplitude, half_cycle, cycles, _direction(rng, "fan", habit, habit_rng),
                     half_cycle_bounds=(low, high))

    def rock():
        amplitude, half_cycle, cycles = rng.uniform(*ROCK_DEG), rng.uniform(*ROCK_HALF_CYCLE_S), int(rng.integers(1, 4))
        _swing_block(rng, knots, 1, amplitude, half_cycle, cycles, _direction(rng, "rock", habit, habit_rng))

    def rotate():
        t, values = knots[-1]
        values = values.copy()
        values[2] += _direction(rng, "rotate", habit, habit_rng) * rng.uniform(*ROTATE_DEG)
        knots.append((t + rng.uniform(*ROTATE_S), values))

    _pause(rng, knots)
    for block in (fan, rock, rotate, fan, rock):
        block()
        _pause(rng, knots)
    while knots[-1][0] < duration_s:
        (fan if rng.random() < 0.5 else rock)()
        _pause(rng, knots)
    return knots


def rotation_protocol(rng: np.random.Generator, skin_surface, geometry, num_frames: int = 1500,
                      start_x_mm: tuple = ROTATION_START_X_MM, start_y_mm: tuple = (-8.0, 8.0),
                      fps: float = FPS, habit: float = HABIT_NONE, habit_rng=None) -> Trajectory:
    """A 2025 rotation scan: fan, rock, rotate 80-100 degrees, fan, rock, about one contact point.

    Args:
        rng: the only source of randomness.
        skin_surface: the phantom's ``skin_surface(x, y)``.
        geometry: ``ImageGeometry`` (its probe gives the face radius; its image the image-mm frame).
        num_frames: N (the real scans have ~1500 = 75 s); a shorter scan is the protocol's beginning.
        start_x_mm, start_y_mm: ranges of the contact point along the arm and across it; the default
            ``ROTATION_START_X_MM`` is the proximal forearm, as close to the elbow (X = 0) as keeps
            the phantom's end out of the sector.
        habit, habit_rng: the sonographer's habit (``rotation_schedule``); the default has none.
    Returns:
        ``Trajectory``; ``meta`` holds ``fan_deg``, ``rock_deg``, ``spin_deg`` [N] (the protocol
        without drift and tremor) and the drawn settings.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames={num_frames} must be >= 2")
    times = np.arange(num_frames) / fps
    plane = "transverse" if rng.random() < 0.5 else "longitudinal"
    knots = rotation_schedule(rng, times[-1], habit, habit_rng)
    channels = minimum_jerk(times, [k[0] for k in knots], np.stack([k[1] for k in knots]))
    x0, y0 = rng.uniform(*start_x_mm), rng.uniform(*start_y_mm)
    base_indentation = rng.uniform(0.5, 2.5)
    offset_mm, offset_deg, settings, _ = _perturbations(rng, num_frames, fps)

    _, normal0 = vectorized_skin(skin_surface)(np.array([x0]), np.array([y0]))
    # Transverse: lateral axis across the arm (tissue Y); longitudinal: along it (tissue X).
    hint = np.array([0.0, 1.0, 0.0]) if plane == "transverse" else np.array([1.0, 0.0, 0.0])
    base = _frame_from_normal(normal0, hint[None])[0]
    # Body-frame order: spin about the probe axis first, so fan and rock act about the rotated
    # probe's own lateral and elevational axes; drift and tremor act last, on the hand.
    angles = np.radians(channels)
    rotation = (Rotation.from_matrix(base) * Rotation.from_euler("z", angles[:, 2:3]) * Rotation.from_euler("x", angles[:, 0:1])
                * Rotation.from_euler("y", angles[:, 1:2]) * Rotation.from_euler("xyz", np.radians(offset_deg)))
    xy = np.array([x0, y0]) + offset_mm[:, :2]
    indentation = np.clip(base_indentation + offset_mm[:, 2], *INDENTATION_MM)
    meta = {"protocol": "rotation", "plane": plane, "start_xy_mm": [x0, y0], "habit": habit, "fan_deg": channels[:, 0],
            "rock_deg": channels[:, 1], "spin_deg": channels[:, 2], **settings}
    return _assemble(geometry, skin_surface, xy, rotation.as_matrix(), indentation, meta)


# --------------------------------------------------------------------------------------------
# 2024 sweeps
# --------------------------------------------------------------------------------------------


def _path_xy(kind: str, u, x_start, x_extent, direction, y0, amplitude, wander):
    """(X, Y) of the path at parameters u in [0, 1] (direction +1: towards the wrist)."""
    x = x_start + direction * x_extent * u
    if kind == "L":
        y = y0 + wander(u)
    elif kind == "C":
        y = y0 + amplitude * np.sin(np.pi * u)
    else:
        y = y0 + amplitude * np.sin(2 * np.pi * u)
    return np.stack([x, y], axis=-1)


def sweep_protocol(rng: np.random.Generator, skin_surface, geometry, name: str, num_frames: int | None = None,
                   arm_x_mm: tuple = (0.0, 250.0), half_width_mm=None, fps: float = FPS) -> Trajectory:
    """A 2024 sweep ``{LH,RH}_{Par,Per}_{L,C,S}_{DtP,PtD}`` along the forearm.

    The path on the skin: L straight with a few mm of wander, C ``Y0 + A sin(pi s)``, S
    ``Y0 + A sin(2 pi s)`` (A = 10-25 mm), 100-180 mm long (arc length in the X-Y plane), covered at
    5-15 mm/s with +-30 % smooth speed modulation. DtP runs from the wrist (large X) to the elbow,
    PtD the other way. Per: lateral axis perpendicular to the path (transverse images); Par: along
    it. The probe axis follows the skin normal with up to +-10 degrees of operator tilt, plus drift
    and tremor.

    Args:
        num_frames: None for the natural length (path length / speed); otherwise exactly this many
            frames: a short scan covers what the drawn speed covers in that time, a long one is slowed
            down (not below 5 mm/s) and then holds still at the end of the drawn path length.
        arm_x_mm: X range of the forearm the path must stay inside (elbow at the low end).
        half_width_mm: optional ``f(X) -> half-width of the arm (mm)``; the path's sideways excursion
            (Y0, A and the wander together) is shrunk where needed so ``|Y| <= 0.45 f(X)``, which
            keeps the probe on the volar face of a narrow wrist (the amplitude in ``meta`` is then
            below 10 mm).
    Returns:
        ``Trajectory``; ``meta`` holds ``path_xy_mm`` [N, 2], ``path_speed_mm_s`` [N],
        ``path_length_mm``, ``tilt_deg`` [N, 2] and the drawn settings.
    """
    _, orientation, kind, direction_name = parse_sweep_name(name)
    speed = rng.uniform(*SWEEP_SPEED_MM_S)
    length = rng.uniform(*SWEEP_LENGTH_MM)
    # Speed modulation: two slow sinusoids scaled to at most +-30 %.
    mod_freq = rng.uniform(0.05, 0.3, size=2)
    mod_phase = rng.uniform(0, 2 * np.pi, size=2)
    # Enough frames to cover the longest path at the slowest modulated speed.
    horizon = int(math.ceil(length / (speed * (1 - SWEEP_SPEED_MODULATION)) * fps)) + 2
    if num_frames is not None:
        if num_frames < 2:
            raise ValueError(f"num_frames={num_frames} must be >= 2")
        horizon = num_frames
    times = np.arange(horizon) / fps
    modulation = np.sin(2 * np.pi * mod_freq[:, None] * times[None] + mod_phase[:, None]).sum(0) / 2
    speed_t = speed * (1 + SWEEP_SPEED_MODULATION * modulation)
    travelled = np.concatenate([[0.0], np.cumsum((speed_t[1:] + speed_t[:-1]) / 2 / fps)])
    if num_frames is None:
        # The natural scan ends at the first frame that reaches the drawn length.
        num_frames = int(np.searchsorted(travelled, length)) + 1
        travelled, speed_t = travelled[:num_frames], speed_t[:num_frames]
    elif travelled[-1] > length:
        # A fixed, long scan: slow down as far as the speed range allows, then hold at the path's end
        # (the operator pauses there) rather than leave the arm.
        slower = max(length / travelled[-1], SWEEP_SPEED_MM_S[0] / speed)
        speed, speed_t, travelled = speed * slower, speed_t * slower, travelled * slower
        speed_t = np.where(travelled > length, 0.0, speed_t)
        travelled = np.minimum(travelled, length)
    length = float(travelled[-1])

    amplitude = rng.uniform(*SWEEP_AMPLITUDE_MM) if kind != "L" else 0.0
    y0 = rng.uniform(-8.0, 8.0) - (amplitude / 2 if kind == "C" else 0.0)
    wander_amp, wander_phase = rng.uniform(1.0, 4.0), rng.uniform(0, 2 * np.pi)
    direction = 1.0 if direction_name == "PtD" else -1.0
    u = np.linspace(0, 1, 2001)
    x_first_draw = rng.random()
    lateral = 1.0  # shrinks the sideways excursion where the forearm is too narrow for it
    for _ in range(4):
        y0_s, amplitude_s, wander_s = y0 * lateral, amplitude * lateral, wander_amp * lateral

        def wander(u, w=wander_s):
            return w * (np.sin(np.pi * u + wander_phase) - np.sin(wander_phase))

        # Arc length in X-Y exceeds the X extent on curved paths: find the extent giving `length`.
        x_extent = length
        for _ in range(4):
            xy = _path_xy(kind, u, 0.0, x_extent, 1.0, y0_s, amplitude_s, wander)
            arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))])
            x_extent *= length / arc[-1]
        margin = float(np.clip((arm_x_mm[1] - arm_x_mm[0] - x_extent) / 2, *SWEEP_END_MARGIN_MM))
        span = arm_x_mm[1] - arm_x_mm[0] - 2 * margin
        if x_extent > span:
            raise ValueError(f"sweep of {x_extent:.0f} mm along the arm does not fit the arm's X range {arm_x_mm}")
        low = arm_x_mm[0] + margin
        x_first = low + x_first_draw * (span - x_extent)
        x_start = x_first if direction > 0 else x_first + x_extent
        xy_dense = _path_xy(kind, u, x_start, x_extent, direction, y0_s, amplitude_s, wander)
        if half_width_mm is None:
            break
        # Keep |Y| <= 0.45 of the local half-width: the probe stays on the volar face of the arm.
        limit = SWEEP_MAX_LATERAL_FRACTION * np.asarray(half_width_mm(xy_dense[:, 0]), dtype=np.float64)
        factor = float(np.min(limit / np.maximum(np.abs(xy_dense[:, 1]), 1e-9)))
        if factor >= 1.0:
            break
        lateral *= 0.98 * factor
    y0, amplitude = y0_s, amplitude_s
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy_dense, axis=0), axis=1))])
    u_t = np.interp(travelled, arc, u)
    path = _path_xy(kind, u_t, x_start, x_extent, direction, y0, amplitude, wander)
    # Tangent of the path from the dense curve, for the image orientation.
    du = 1e-4
    ahead = _path_xy(kind, np.clip(u_t + du, 0, 1), x_start, x_extent, direction, y0, amplitude, wander)
    behind = _path_xy(kind, np.clip(u_t - du, 0, 1), x_start, x_extent, direction, y0, amplitude, wander)
    tangent_xy = ahead - behind
    tangent_xy /= np.linalg.norm(tangent_xy, axis=1, keepdims=True)

    offset_mm, offset_deg, settings, _ = _perturbations(rng, num_frames, fps)
    # Operator tilt about the lateral and elevational axes: a constant lean plus slow wander, kept in +-10.
    tilt = np.clip(rng.uniform(-5, 5, size=2) + ou_drift(rng, num_frames, [3.0, 3.0], [2.0, 2.0], fps),
                   -SWEEP_TILT_DEG, SWEEP_TILT_DEG)
    xy = path + offset_mm[:, :2]
    _, normals = vectorized_skin(skin_surface)(xy[:, 0], xy[:, 1])
    tangent = np.concatenate([tangent_xy, np.zeros((num_frames, 1))], axis=1)
    if orientation == "Par":
        hint = tangent
    else:
        hint = np.cross(normals, tangent)  # in the skin plane, perpendicular to the path
    base = _frame_from_normal(normals, hint)
    rotation = (Rotation.from_matrix(base) * Rotation.from_euler("xy", np.radians(tilt))
                * Rotation.from_euler("xyz", np.radians(offset_deg)))
    indentation = np.clip(rng.uniform(0.5, 2.5) + offset_mm[:, 2], *INDENTATION_MM)
    meta = {"protocol": "sweep", "name": name, "path_xy_mm": path, "path_speed_mm_s": speed_t,
            "path_length_mm": float(travelled[-1]), "mean_speed_mm_s": speed, "amplitude_mm": amplitude,
            "tilt_deg": tilt, **settings}
    return _assemble(geometry, skin_surface, xy, rotation.as_matrix(), indentation, meta)
