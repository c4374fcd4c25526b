"""Probe trajectories (simulation/trajectory.py): building blocks and the 2025 / 2024 protocols.

Protocol bounds are SIMULATOR.md's ("Trajectories"); the probe must stay on the phantom's skin.
"""

import numpy as np
import pytest

from simulation import trajectory as T
from simulation.phantom import ForearmPhantom, PhantomParameters
from simulation.probe import CurvilinearProbe, ImageGeometry

PIXEL_MM = (0.229389190673828, 0.220979690551758)


@pytest.fixture(scope="module")
def geometry():
    return ImageGeometry(CurvilinearProbe(), 480, 640, PIXEL_MM)


@pytest.fixture(scope="module")
def phantom():
    return ForearmPhantom(PhantomParameters())


def half_width(phantom):
    p = phantom.params
    return lambda x: p.half_width_mm * (1 - p.taper_per_100mm / 100 * np.asarray(x))


def assert_rigid(tforms, tol=1e-9):
    rotation = tforms[:, :3, :3]
    np.testing.assert_allclose(np.swapaxes(rotation, 1, 2) @ rotation, np.broadcast_to(np.eye(3), rotation.shape), atol=tol)
    np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=tol)
    np.testing.assert_array_equal(tforms[:, 3], np.broadcast_to([0.0, 0.0, 0.0, 1.0], (len(tforms), 4)))


def assert_on_skin(traj, phantom, probe):
    """The touching face point lies on the convex face and within the indentation (<= 3 mm) of the skin."""
    tform = traj.tform_tissue_from_probe
    face_probe = np.einsum("nji,nj->ni", tform[:, :3, :3], traj.face_points - tform[:, :3, 3])
    np.testing.assert_allclose(np.hypot(face_probe[:, 0], face_probe[:, 2]), probe.radius_mm, atol=1e-9)
    np.testing.assert_allclose(face_probe[:, 1], 0.0, atol=1e-9)
    assert np.all(np.abs(np.arctan2(face_probe[:, 0], face_probe[:, 2])) <= probe.half_fov_rad + 1e-12)
    skin, normal = phantom.skin_surface(traj.face_points[:, 0], traj.face_points[:, 1])
    # Depth of the face point below the skin, along the inward normal.
    depth = np.einsum("ni,ni->n", skin - traj.face_points, normal)
    assert depth.min() >= -0.05 and depth.max() <= 3.05, (depth.min(), depth.max())
    # The skin point under the face is pressed in exactly by the indentation, along the normal.
    np.testing.assert_allclose(np.linalg.norm(traj.skin_points - traj.face_points, axis=1), traj.indentation_mm,
                               atol=1e-9)


# ---- building blocks --------------------------------------------------------------------------


def test_minimum_jerk_endpoints_and_smoothness():
    times = np.linspace(-0.5, 2.5, 3001)
    q = T.minimum_jerk(times, [0.0, 1.0, 2.0], [[0.0], [10.0], [-4.0]])[:, 0]
    assert q[0] == 0.0 and q[-1] == -4.0
    np.testing.assert_allclose(q[np.searchsorted(times, 1.0)], 10.0, atol=1e-6)
    velocity = np.gradient(q, times)
    # Zero velocity at the knots, peak 1.875 x (distance / duration) inside a segment.
    assert abs(velocity[np.searchsorted(times, 1.0)]) < 0.05
    np.testing.assert_allclose(np.abs(velocity[(times > 0) & (times < 1)]).max(), 1.875 * 10.0, rtol=1e-3)
    with pytest.raises(ValueError, match="strictly increasing"):
        T.minimum_jerk(times, [0.0, 0.0], [[0.0], [1.0]])


def test_ou_drift_rms_and_correlation_time():
    rng = np.random.default_rng(3)
    path = T.ou_drift(rng, 60000, [1.0, 2.0], [1.0, 2.0])
    np.testing.assert_allclose(path.std(axis=0), [1.0, 2.0], rtol=0.1)
    for axis, tau in enumerate((1.0, 2.0)):
        lag = int(tau * T.FPS)
        x = path[:, axis]
        corr = np.corrcoef(x[:-lag], x[lag:])[0, 1]
        assert 0.25 < corr < 0.5, corr  # exp(-1) = 0.37 for an OU; smoothing raises it a little


def test_tremor_band_and_rms():
    rng = np.random.default_rng(5)
    for _ in range(10):
        tremor = T.sample_tremor(rng)
        rms = tremor.rms()
        assert T.TREMOR_MM[0] - 1e-12 <= np.linalg.norm(rms[:3]) <= T.TREMOR_MM[1] + 1e-12
        assert T.TREMOR_DEG[0] - 1e-12 <= np.linalg.norm(rms[3:]) <= T.TREMOR_DEG[1] + 1e-12
    # Densely sampled (unaliased), the power lies in 8-12 Hz.
    fs, duration = 400.0, 40.0
    signal = tremor(np.arange(int(fs * duration)) / fs)
    power = np.abs(np.fft.rfft(signal, axis=0)) ** 2
    freqs = np.fft.rfftfreq(signal.shape[0], 1 / fs)
    band = (freqs >= 7.5) & (freqs <= 12.5)
    assert (power[band].sum(axis=0) / power.sum(axis=0)).min() > 0.95
    np.testing.assert_allclose(signal.std(axis=0), rms, rtol=0.15)  # close components beat over 40 s
    # At 20 fps it aliases into 0-10 Hz (8-10 Hz stays, 10-12 Hz folds to 8-10 Hz) with the same power.
    frames = tremor(np.arange(2000) / T.FPS)
    np.testing.assert_allclose(frames.std(axis=0), rms, rtol=0.25)


# ---- 2025 rotation protocol -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotation_protocol_bounds(seed, phantom, geometry):
    traj = T.rotation_protocol(np.random.default_rng(seed), phantom.skin_surface, geometry, 1500)
    assert len(traj) == 1500 and traj.tform_tissue_from_image.shape == (1500, 4, 4)
    assert traj.tform_tissue_from_image.dtype == np.float64
    assert_rigid(traj.tform_tissue_from_image)
    assert_on_skin(traj, phantom, geometry.probe)
    fan, rock, spin = traj.meta["fan_deg"], traj.meta["rock_deg"], traj.meta["spin_deg"]
    # Fan +-15-30 degrees, peak speeds 20-60 degrees/s.
    assert 2 * T.FAN_DEG[0] - 1e-9 <= np.ptp(fan) and np.abs(fan).max() <= T.FAN_DEG[1] + 1e-9
    fan_speed = np.abs(np.diff(fan)) * T.FPS
    assert T.FAN_PEAK_DEG_S[0] * 0.9 <= fan_speed.max() <= T.FAN_PEAK_DEG_S[1] * 1.01
    assert T.ROCK_DEG[0] - 1e-9 <= np.abs(rock).max() <= T.ROCK_DEG[1] + 1e-9
    assert T.ROTATE_DEG[0] - 1e-9 <= np.abs(spin[-1]) <= T.ROTATE_DEG[1] + 1e-9
    # The rotation happens after the first fan and rock: the scan starts unrotated.
    assert spin[0] == 0.0 and np.abs(spin[:100]).max() == 0.0
    # Pauses: runs of >= 0.3 s with every channel still.
    still = np.all(np.abs(np.diff(np.stack([fan, rock, spin]), axis=1)) < 1e-9, axis=0)
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], still.astype(int), [0]]))))[::2]
    assert runs.max() >= int(T.PAUSE_S[0] * T.FPS) - 1
    # The contact stays put: drift only (0.5-1.5 mm RMS, a few mm at most).
    wander = np.linalg.norm(traj.skin_points[:, :2] - traj.meta["start_xy_mm"], axis=1)
    assert wander.max() < 8.0
    # Proximal forearm, near the elbow (X = 0).
    assert T.ROTATION_START_X_MM[0] <= traj.meta["start_xy_mm"][0] <= T.ROTATION_START_X_MM[1]


def test_rotation_protocol_deterministic_and_short(phantom, geometry):
    a = T.rotation_protocol(np.random.default_rng(7), phantom.skin_surface, geometry, 24)
    b = T.rotation_protocol(np.random.default_rng(7), phantom.skin_surface, geometry, 24)
    c = T.rotation_protocol(np.random.default_rng(8), phantom.skin_surface, geometry, 24)
    np.testing.assert_array_equal(a.tform_tissue_from_image, b.tform_tissue_from_image)
    assert not np.allclose(a.tform_tissue_from_image, c.tform_tissue_from_image)
    with pytest.raises(ValueError, match="num_frames"):
        T.rotation_protocol(np.random.default_rng(7), phantom.skin_surface, geometry, 1)


def first_moves(channel: np.ndarray) -> np.ndarray:
    """Signs of the first movement of each swing block: where a channel at exactly 0 (between blocks)
    starts to move."""
    starts = np.flatnonzero((channel[:-1] == 0.0) & (channel[1:] != 0.0))
    return np.sign(channel[starts + 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_habit_sets_the_directions_and_nothing_else(seed, phantom, geometry):
    free = T.rotation_protocol(np.random.default_rng(seed), phantom.skin_surface, geometry, 1500)
    for habit, expected in ((1.0, 1.0), (0.0, -1.0)):
        traj = T.rotation_protocol(np.random.default_rng(seed), phantom.skin_surface, geometry, 1500,
                                   habit=habit, habit_rng=np.random.default_rng(100 + seed))
        fan, rock, spin = traj.meta["fan_deg"], traj.meta["rock_deg"], traj.meta["spin_deg"]
        moves = np.concatenate([first_moves(fan), first_moves(rock)])
        assert len(moves) >= 4 and np.all(moves == expected)  # fan, rock, (turn), fan, rock at least
        assert np.sign(spin[-1]) == expected
        # The same amplitudes, timings, contact wander and indentation as without a habit.
        for key in ("fan_deg", "rock_deg", "spin_deg"):
            np.testing.assert_array_equal(np.abs(traj.meta[key]), np.abs(free.meta[key]))
        np.testing.assert_array_equal(traj.skin_points, free.skin_points)
        np.testing.assert_array_equal(traj.indentation_mm, free.indentation_mm)


def test_habit_probability_and_default(phantom, geometry):
    # A habit of 0.8: 80 % of the moves go the habitual way (binomial, 4 standard deviations).
    habit_rng = np.random.default_rng(5)
    signs = []
    for seed in range(60):
        knots = T.rotation_schedule(np.random.default_rng(seed), 75.0, habit=0.8, habit_rng=habit_rng)
        values = np.stack([v for _, v in knots])
        for channel in (0, 1):
            signs.extend(first_moves(values[:, channel]))
        signs.append(np.sign(values[-1, 2]))
    signs = np.array(signs)
    assert len(signs) > 300
    assert abs(np.mean(signs > 0) - 0.8) < 4 * np.sqrt(0.8 * 0.2 / len(signs))
    # No habit (the default): the habit's generator is not touched and directions stay mixed.
    unused = np.random.default_rng(3)
    state = unused.bit_generator.state
    a = T.rotation_protocol(np.random.default_rng(4), phantom.skin_surface, geometry, 300)
    b = T.rotation_protocol(np.random.default_rng(4), phantom.skin_surface, geometry, 300, habit=0.5, habit_rng=unused)
    np.testing.assert_array_equal(a.tform_tissue_from_image, b.tform_tissue_from_image)
    assert unused.bit_generator.state == state
    free = np.concatenate([first_moves(np.stack([v for _, v in T.rotation_schedule(np.random.default_rng(s), 75.0)])[:, 0])
                           for s in range(30)])
    assert 0.3 < np.mean(free > 0) < 0.7
    with pytest.raises(ValueError, match="habit=1.2"):
        T.rotation_schedule(np.random.default_rng(0), 10.0, habit=1.2, habit_rng=habit_rng)
    with pytest.raises(ValueError, match="needs a habit_rng"):
        T.rotation_schedule(np.random.default_rng(0), 10.0, habit=1.0)


def test_image_pose_places_contact_row_on_the_face(phantom, geometry):
    """The image's centre column at the contact row maps onto the face's centre line point."""
    traj = T.rotation_protocol(np.random.default_rng(0), phantom.skin_surface, geometry, 50)
    sx, sy = geometry.pixel_mm
    contact_px = np.array([(geometry.width + 1) / 2 * sx, geometry.probe.contact_depth_mm, 0.0, 1.0])
    centre = traj.tform_tissue_from_image @ contact_px
    on_axis = traj.tform_tissue_from_probe @ np.array([0.0, 0.0, geometry.probe.radius_mm, 1.0])
    np.testing.assert_allclose(centre, on_axis, atol=1e-9)


# ---- 2024 sweeps -------------------------------------------------------------------------------


def test_sweep_names():
    names = T.sweep_scan_names()
    assert len(names) == 24 == len(set(names))
    assert "LH_Par_L_DtP" in names and "RH_Per_S_PtD" in names
    assert T.parse_sweep_name("RH_Per_C_PtD") == ("RH", "Per", "C", "PtD")
    with pytest.raises(ValueError, match="LH_Diag_L_DtP"):
        T.parse_sweep_name("LH_Diag_L_DtP")


@pytest.mark.parametrize("name", [n for n in T.sweep_scan_names() if n.startswith("RH")])
def test_sweep_protocol_bounds(name, phantom, geometry):
    traj = T.sweep_protocol(np.random.default_rng(11), phantom.skin_surface, geometry, name,
                            arm_x_mm=(0.0, phantom.params.length_mm), half_width_mm=half_width(phantom))
    _, orientation, kind, direction = T.parse_sweep_name(name)
    assert_rigid(traj.tform_tissue_from_image)
    assert_on_skin(traj, phantom, geometry.probe)
    meta = traj.meta
    assert T.SWEEP_LENGTH_MM[0] <= meta["path_length_mm"] <= T.SWEEP_LENGTH_MM[1] + 0.75
    assert T.SWEEP_SPEED_MM_S[0] <= meta["mean_speed_mm_s"] <= T.SWEEP_SPEED_MM_S[1]
    speed = meta["path_speed_mm_s"]
    assert speed.min() >= T.SWEEP_SPEED_MM_S[0] * 0.7 - 1e-9 and speed.max() <= T.SWEEP_SPEED_MM_S[1] * 1.3 + 1e-9
    # The length at the drawn speeds: 0.25-0.75 mm a frame on average.
    path = meta["path_xy_mm"]
    step = np.linalg.norm(np.diff(path, axis=0), axis=1)
    assert 0.25 * 0.7 <= step.mean() <= 0.75 * 1.3
    np.testing.assert_allclose(step.sum(), meta["path_length_mm"], rtol=0.01)
    # Direction: distal (wrist, large X) to proximal or back.
    moved = path[-1, 0] - path[0, 0]
    assert (moved < -50) if direction == "DtP" else (moved > 50)
    # Lateral image axis against the path tangent (tilt and drift allow ~15 degrees).
    tangent = np.gradient(path, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    lateral = traj.tform_tissue_from_probe[:, :2, 0]
    cosine = np.abs(np.einsum("ni,ni->n", lateral, tangent)) / np.linalg.norm(lateral, axis=1)
    if orientation == "Par":
        assert np.median(cosine) > np.cos(np.radians(15))
    else:
        assert np.median(cosine) < np.sin(np.radians(15))
    assert np.abs(meta["tilt_deg"]).max() <= T.SWEEP_TILT_DEG
    # The beam stays within tilt + drift of the inward skin normal.
    _, normal = phantom.skin_surface(traj.skin_points[:, 0], traj.skin_points[:, 1])
    beam = traj.tform_tissue_from_probe[:, :3, 2]
    angle = np.degrees(np.arccos(np.clip(-np.einsum("ni,ni->n", beam, normal), -1, 1)))
    assert angle.max() < T.SWEEP_TILT_DEG * np.sqrt(2) + 8.0
    if kind != "L":  # the amplitude may shrink below 10 mm at a narrow wrist, never grow
        assert 0 < meta["amplitude_mm"] <= T.SWEEP_AMPLITUDE_MM[1]
        assert np.ptp(path[:, 1]) > 0.8 * meta["amplitude_mm"]
    # On the volar face, inside the arm's length with a margin.
    assert np.all(np.abs(path[:, 1]) <= T.SWEEP_MAX_LATERAL_FRACTION * half_width(phantom)(path[:, 0]) + 1e-9)
    assert path[:, 0].min() >= 10 - 1e-9 and path[:, 0].max() <= phantom.params.length_mm - 10 + 1e-9


def test_sweeps_fit_narrow_arms(geometry):
    """Random thin, strongly tapered arms: every sweep stays on the skin (no ValueError off the arm)."""
    from simulation.phantom import sample_parameters

    rng = np.random.default_rng(4)
    for k in range(6):
        arm = ForearmPhantom(sample_parameters(rng, "LR"[k % 2]))
        for name in ("LH_Par_S_DtP", "RH_Per_C_PtD"):
            traj = T.sweep_protocol(rng, arm.skin_surface, geometry, name, arm_x_mm=(0.0, arm.params.length_mm),
                                    half_width_mm=half_width(arm))
            assert_on_skin(traj, arm, geometry.probe)


def test_sweep_fixed_frame_count(phantom, geometry):
    traj = T.sweep_protocol(np.random.default_rng(2), phantom.skin_surface, geometry, "LH_Per_C_DtP", num_frames=30)
    assert len(traj) == 30
    assert_on_skin(traj, phantom, geometry.probe)


def test_long_fixed_sweep_holds_at_the_end(phantom, geometry):
    """1500 frames (75 s) are longer than any sweep: the probe slows to >= 5 mm/s, then stays on the arm."""
    traj = T.sweep_protocol(np.random.default_rng(9), phantom.skin_surface, geometry, "RH_Par_S_PtD", num_frames=1500,
                            arm_x_mm=(0.0, phantom.params.length_mm), half_width_mm=half_width(phantom))
    assert len(traj) == 1500
    assert_on_skin(traj, phantom, geometry.probe)
    assert traj.meta["path_length_mm"] <= T.SWEEP_LENGTH_MM[1] + 1e-9
    moving = traj.meta["path_speed_mm_s"][traj.meta["path_speed_mm_s"] > 0]
    assert moving.min() >= T.SWEEP_SPEED_MM_S[0] * (1 - T.SWEEP_SPEED_MODULATION) - 1e-9
