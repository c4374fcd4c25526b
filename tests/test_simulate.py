"""The synthetic dataset writer (simulation/dataset.py), landmarks, preview and the simulate.py CLI.

Everything runs on the ``tiny`` preset (120x160 frames, 24 frames per scan) with the real phantom and
renderer; the datasets are generated once per module.
"""

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest

import simulate
from simulation import dataset as D
from simulation import landmarks as L
from utils.calibration import REAL_TFORM_CALIB_R_T, REAL_TFORM_CALIB_SCALE, load_calibration
from utils.challenge_data import detect_layout, find_scans, read_dataset_keys, read_scan, validate_tforms

TINY = D.get_preset("tiny")


@pytest.fixture(scope="module")
def train_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_train")
    D.generate_dataset(root, "tiny", seed=0)
    return root


@pytest.fixture(scope="module")
def test_root(tmp_path_factory):
    # Two workers here, one above: the frames must not depend on it.
    root = tmp_path_factory.mktemp("tiny_test")
    D.generate_dataset(root, "tiny", seed=0, layout="test", workers=2)
    return root


def official_files(root, subject="000"):
    """{relative path: bytes} of one subject's challenge files (no side data)."""
    root = Path(root)
    paths = [p for p in root.rglob("*.h5") if "simulation" not in p.parts and subject in str(p.relative_to(root))]
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(paths)}


# ---- presets ------------------------------------------------------------------------------------


def test_presets():
    p2025 = D.get_preset("tusrec2025")
    assert (p2025.protocol, p2025.frames, p2025.height, p2025.width, p2025.landmarks) == ("rotation", 1500, 480, 640, 100)
    assert p2025.scan_names() == ["LH_rotation", "RH_rotation"]
    p2024 = D.get_preset("tusrec2024")
    assert p2024.landmarks == 20 and p2024.frames is None and len(p2024.scan_names()) == 24
    demo = D.get_preset("demo")
    assert demo.subjects * 2 * demo.frames <= 3000  # `make demo` must stay within minutes on 2 cores
    assert D.get_preset("tiny", subjects=1, frames=None).frames == TINY.frames  # None keeps the preset's
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        D.get_preset("huge")
    with pytest.raises(ValueError, match="unknown preset field"):
        D.get_preset("tiny", fps=30)
    with pytest.raises(ValueError, match="frames=1"):
        D.get_preset("tiny", frames=1)
    with pytest.raises(ValueError, match="protocol='spiral'"):
        D.get_preset("tiny", protocol="spiral")
    assert p2025.habit == 0.5  # no habit unless asked for (SIMULATOR.md, "Direction cues")
    assert D.get_preset("tiny", habit=1.0).habit == 1.0
    with pytest.raises(ValueError, match="habit=1.5"):
        D.get_preset("tiny", habit=1.5)
    with pytest.raises(ValueError, match="protocol='sweeps' has none"):
        D.get_preset("tusrec2024", habit=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p2025.frames = 3


def test_scaled_calibration_keeps_field_of_view():
    scale, calib = D.scaled_calibration(120, 160)
    np.testing.assert_allclose(np.diag(scale)[:2] * [160, 120], np.diag(REAL_TFORM_CALIB_SCALE)[:2] * [640, 480])
    np.testing.assert_array_equal(calib, REAL_TFORM_CALIB_R_T)


def test_stratified_frames():
    rng = np.random.default_rng(0)
    frames = L.stratified_frames(rng, 1500, 100)
    assert frames.min() >= 1 and frames.max() <= 1499 and np.all(np.diff(frames) >= 0)
    # One per stratum [1 + 14.99 k, 1 + 14.99 (k + 1)).
    edges = 1 + 1499 * np.arange(101) / 100
    assert np.all((frames >= np.floor(edges[:-1])) & (frames < np.ceil(edges[1:])))
    assert len(np.unique(frames)) == 100
    small = L.stratified_frames(rng, 5, 10)  # more landmarks than frames: repeats, never frame 0
    assert small.min() >= 1 and small.max() <= 4 and len(small) == 10
    with pytest.raises(ValueError, match="num_frames=1"):
        L.stratified_frames(rng, 1, 3)


# ---- layout and dtypes ----------------------------------------------------------------------------


def test_train_layout(train_root):
    assert detect_layout(train_root) == "train"
    refs = find_scans(train_root)
    assert [(r.subject, r.name) for r in refs] == [(s, n) for s in range(TINY.subjects) for n in ("LH_rotation", "RH_rotation")]
    for ref in refs:
        scan = read_scan(ref)  # the challenge readers validate shapes, dtypes, rigidity and landmarks
        assert scan.frames.dtype == np.uint8 and scan.frames.shape == (TINY.frames, TINY.height, TINY.width)
        assert scan.tforms.dtype == np.float32 and scan.tforms.shape == (TINY.frames, 4, 4)
        assert scan.landmarks.dtype == np.int64 and scan.landmarks.shape == (TINY.landmarks, 3)
        with h5py.File(ref.frames_path, "r") as handle:
            assert sorted(handle) == ["frames", "tforms"]
            assert handle["tforms"].dtype == np.float32
        assert scan.frames.max() > 100 and (scan.frames > 0).mean() > 0.2  # an image, not a blank
    calibration = load_calibration(train_root / "calib_matrix.csv")
    np.testing.assert_allclose(calibration.scale, D.scaled_calibration(TINY.height, TINY.width)[0])
    np.testing.assert_allclose(calibration.calib_R_T, REAL_TFORM_CALIB_R_T)
    with h5py.File(train_root / "landmarks" / "landmark_000.h5", "r") as handle:
        assert sorted(handle) == ["LH_rotation", "RH_rotation"]


def test_test_layout_and_worker_independence(train_root, test_root):
    assert detect_layout(test_root) == "test"
    assert read_dataset_keys(test_root / "dataset_keys.h5") == [
        f"sub{s:03d}__{n}" for s in range(TINY.subjects) for n in ("LH_rotation", "RH_rotation")]
    for folder in ("frames", "transfs", "landmarks"):
        assert (test_root / folder).is_dir()
    assert not (test_root / "frames_transfs").exists()
    with h5py.File(test_root / "frames" / "000" / "LH_rotation.h5", "r") as handle:
        assert list(handle) == ["frames"]
    with h5py.File(test_root / "transfs" / "000" / "LH_rotation.h5", "r") as handle:
        assert list(handle) == ["tforms"]
    for ref_train, ref_test in zip(find_scans(train_root), find_scans(test_root)):
        a, b = read_scan(ref_train), read_scan(ref_test)
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.tforms, b.tforms)
        np.testing.assert_array_equal(a.landmarks, b.landmarks)


# ---- determinism -----------------------------------------------------------------------------------


def test_deterministic_bytes_and_seed_dependence(train_root, tmp_path):
    # Subject 000 alone: draws are keyed by subject, so it must equal the 2-subject dataset's byte for byte.
    D.generate_dataset(tmp_path / "again", "tiny", seed=0, subjects=1)
    same = official_files(tmp_path / "again")
    assert same == official_files(train_root)
    assert (tmp_path / "again" / "calib_matrix.csv").read_bytes() == (train_root / "calib_matrix.csv").read_bytes()
    D.generate_dataset(tmp_path / "other", "tiny", seed=1, subjects=1)
    other = official_files(tmp_path / "other")
    assert other.keys() == same.keys()
    assert all(other[k] != same[k] for k in same)
    a = read_scan(find_scans(tmp_path / "again")[0])
    b = read_scan(find_scans(tmp_path / "other")[0])
    assert not np.array_equal(a.frames, b.frames) and not np.allclose(a.tforms, b.tforms)


def test_subjects_and_arms_differ(train_root):
    scans = {(s.subject, s.name): s for s in map(read_scan, find_scans(train_root))}
    assert not np.array_equal(scans[0, "LH_rotation"].frames, scans[1, "LH_rotation"].frames)
    side = {k: D.read_side_file(D.side_file_path(train_root, *k)) for k in scans}
    p0, p1 = side[0, "LH_rotation"]["phantom_parameters"], side[1, "LH_rotation"]["phantom_parameters"]
    assert p0 != p1 and p0["side"] == "L" and side[0, "RH_rotation"]["phantom_parameters"]["side"] == "R"
    # Each scan has its own tracker camera.
    assert not np.allclose(side[0, "LH_rotation"]["tform_camera_from_tissue"],
                           side[0, "RH_rotation"]["tform_camera_from_tissue"])


# ---- poses and landmarks -----------------------------------------------------------------------------


def test_poses_rigid_and_consistent(train_root):
    calibration = load_calibration(train_root / "calib_matrix.csv")
    for ref in find_scans(train_root):
        scan = read_scan(ref)
        side = D.read_side_file(D.side_file_path(train_root, ref.subject, ref.name))
        poses = side["tform_tissue_from_image"]
        rotation = poses[:, :3, :3]
        np.testing.assert_allclose(np.swapaxes(rotation, 1, 2) @ rotation, np.broadcast_to(np.eye(3), rotation.shape),
                                   atol=1e-12)
        validate_tforms(scan.tforms, ref.frames_path)
        # tforms = T_cam<-tissue . T_tissue<-image . C^-1, stored as float32.
        expected = side["tform_camera_from_tissue"] @ poses @ np.linalg.inv(calibration.calib_R_T)
        np.testing.assert_allclose(scan.tforms, expected, atol=2e-4, rtol=0)


def test_landmarks_reproject_to_their_tissue_points(train_root):
    calibration = load_calibration(train_root / "calib_matrix.csv")
    sector = D.make_geometry(TINY, calibration.scale).sector_mask()
    inner = L.ndimage.binary_erosion(sector, iterations=L.MIN_SECTOR_MARGIN_PX, border_value=0)
    for ref in find_scans(train_root):
        scan = read_scan(ref)
        side = D.read_side_file(D.side_file_path(train_root, ref.subject, ref.name))
        landmarks = scan.landmarks
        np.testing.assert_array_equal(landmarks, side["landmarks"])
        frames, x, y = landmarks.T
        assert frames.min() >= 1 and frames.max() <= TINY.frames - 1
        assert x.min() >= 1 and x.max() <= TINY.width and y.min() >= 1 and y.max() <= TINY.height
        assert inner[y - 1, x - 1].all()  # >= 5 px inside the sector
        assert (scan.frames[frames, y - 1, x - 1] > 0).all()  # visible
        pixels = np.stack([x, y, np.zeros_like(x), np.ones_like(x)]).astype(np.float64)
        tforms = scan.tforms.astype(np.float64)[frames]  # as read from the file (float32)
        camera_to_tissue = np.linalg.inv(side["tform_camera_from_tissue"])
        # T_cam<-tissue^-1 . tforms[f] . C . S . [x, y, 0, 1] is the landmark's tissue point.
        mapped = np.stack([(camera_to_tissue @ tforms[k] @ calibration.calib_R_T @ calibration.scale @ pixels[:, k])[:3]
                           for k in range(len(x))])
        error = np.linalg.norm(mapped - side["landmark_points"], axis=1)
        assert error.max() < 0.1, error.max()
        assert set(side["landmark_kinds"]) <= {"bone", "fascia", "vessel", "skin", "boundary", "bright"}


def test_landmarks_sit_on_label_boundaries(train_root):
    from simulation.phantom import ForearmPhantom, PhantomParameters

    for ref in find_scans(train_root)[:2]:
        side = D.read_side_file(D.side_file_path(train_root, ref.subject, ref.name))
        phantom = ForearmPhantom(PhantomParameters.from_dict(side["phantom_parameters"]))
        on_boundary = 0
        scale = load_calibration(train_root / "calib_matrix.csv").scale
        for (frame, x, y), kind in zip(side["landmarks"], side["landmark_kinds"]):
            pose = side["tform_tissue_from_image"][frame]
            neighbours = np.array([[x, y], [x + 1, y], [x - 1, y], [x, y + 1], [x, y - 1]], dtype=np.float64)
            pts = (pose @ scale @ np.c_[neighbours, np.zeros(5), np.ones(5)].T)[:3].T
            on_boundary += len(set(phantom.labels(pts).tolist())) > 1
        assert on_boundary >= 0.8 * len(side["landmarks"])


# ---- CLI and preview ------------------------------------------------------------------------------------


def test_cli_writes_refuses_and_previews(tmp_path, capsys):
    out, preview = tmp_path / "data", tmp_path / "preview"
    args = ["--out", str(out), "--preset", "tiny", "--subjects", "1", "--frames", "6", "--workers", "1"]
    assert simulate.main(args + ["--layout", "test", "--preview", str(preview)]) == 0
    assert detect_layout(out) == "test" and len(find_scans(out)) == 2
    assert read_scan(find_scans(out)[0]).frames.shape == (6, TINY.height, TINY.width)
    pngs = sorted(p.name for p in preview.glob("*.png"))
    assert pngs == ["000_LH_rotation_frames.png", "000_LH_rotation_trajectory.png",
                    "000_RH_rotation_frames.png", "000_RH_rotation_trajectory.png"]
    assert all((preview / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    with pytest.raises(SystemExit) as exit_info:
        simulate.main(args)
    assert exit_info.value.code == 2
    assert "not empty" in capsys.readouterr().err
    # --overwrite replaces the dataset, here with the other layout (no leftovers to make it ambiguous).
    (out / "notes.txt").write_text("kept")
    assert simulate.main(args + ["--overwrite"]) == 0
    assert detect_layout(out) == "train" and (out / "notes.txt").read_text() == "kept"
    # Preview an existing dataset without generating.
    assert simulate.main(["--out", str(out), "--preview", str(tmp_path / "p2"), "--preview-only"]) == 0
    assert len(list((tmp_path / "p2").glob("*.png"))) == 4
    # Previewing a folder that holds no dataset fails with a message, not a traceback.
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        simulate.main(["--out", str(tmp_path / "empty"), "--preview", str(tmp_path / "p3"), "--preview-only"])
    assert exit_info.value.code == 1
    assert "not a TUS-REC dataset root" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (["--frames", "1"], "expected an integer >= 2"),
    (["--frames", "ten"], "'ten' is not an integer"),
    (["--height", "100"], "--height and --width go together"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--layout", "val"], "invalid choice: 'val'"),
    (["--preview-only"], "--preview-only needs --preview"),
    (["--habit", "2"], "expected a probability in [0, 1]"),
    (["--habit", "often"], "invalid float value: 'often'"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as exit_info:
        simulate.main(["--out", str(tmp_path / "x"), "--preset", "tiny", *bad])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_full_size_sweeps_scan(tmp_path):
    """A 480x640 2024 sweep at the default probe grid (few frames): sizes, landmarks, sweep names."""
    refs = D.generate_dataset(tmp_path, "tusrec2024", seed=3, subjects=1, frames=6, density=2.0, workers=2)
    assert len(refs) == 24 and {r.name for r in refs} == set(D.sim_trajectory.sweep_scan_names())
    scan = read_scan(refs[0])
    assert scan.frames.shape == (6, 480, 640) and scan.landmarks.shape == (20, 3)
    assert load_calibration(tmp_path / "calib_matrix.csv").scale[0, 0] == REAL_TFORM_CALIB_SCALE[0, 0]


def test_preset_habit_reaches_the_rotation_protocol():
    """``Preset.habit`` is what the dataset's trajectories follow (every move the habitual way at 1)."""
    preset = D.get_preset("tusrec2025", habit=1.0, frames=600)
    phantom = D.default_phantom_factory(np.random.default_rng(0), "LH")
    geometry = D.make_geometry(preset, D.scaled_calibration(preset.height, preset.width)[0])
    traj = D.make_trajectory(np.random.default_rng(1), phantom, geometry, preset, "LH_rotation",
                             habit_rng=np.random.default_rng(2))
    fan = traj.meta["fan_deg"]
    starts = np.flatnonzero((fan[:-1] == 0.0) & (fan[1:] != 0.0))
    assert traj.meta["habit"] == 1.0 and len(starts) >= 1 and np.all(fan[starts + 1] > 0)
