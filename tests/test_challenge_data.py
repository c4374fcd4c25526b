"""Challenge data layouts: discovery, exact read-back, validation messages, and the real PLUS scans."""

import h5py
import numpy as np
import pytest
import torch

from reference import REAL_CALIB_R_T, frame_to_frame, random_tforms
from utils.calibration import load_calibration, read_calib_matrices, write_calib_matrices
from utils.challenge_data import (
    POSE_ORTHONORMAL_TOLERANCE,
    ScanFile,
    dataset_key,
    detect_layout,
    find_scans,
    read_landmarks,
    read_scan,
    write_dataset_keys,
    write_landmarks,
    write_scan,
)
from utils.transform import global_transforms, local_transforms

HEIGHT, WIDTH = 6, 10  # non-square on purpose: x runs over W, y over H


def make_scan(rng, num_frames):
    frames = rng.integers(0, 256, (num_frames, HEIGHT, WIDTH), dtype=np.uint8)
    tforms = random_tforms(rng, num_frames).astype(np.float32)
    landmarks = np.stack(
        [rng.integers(1, num_frames, 5), rng.integers(1, WIDTH + 1, 5), rng.integers(1, HEIGHT + 1, 5)], axis=1
    )
    return frames, tforms, landmarks


def build_dataset(root, layout, landmark_folder="landmarks", seed=0):
    """Subjects 0, 3 and 12 with 2, 3 and 1 scans of different lengths; returns {key: (f, t, l)}."""
    rng = np.random.default_rng(seed)
    plan = {0: ["RH_rotation", "LH_rotation"], 3: ["LH_Par_C_DtP", "RH_Per_S_PtD", "LH_rotation"], 12: ["RH_rotation"]}
    written = {}
    for subject, names in plan.items():
        per_subject = {}
        for k, name in enumerate(names):
            frames, tforms, landmarks = make_scan(rng, 4 + k + subject % 5)
            write_scan(root, subject, name, frames, tforms, layout=layout)
            per_subject[name] = landmarks
            written[dataset_key(f"{subject:03d}", name)] = (frames, tforms, landmarks)
        write_landmarks(root, subject, per_subject, folder=landmark_folder)
    if layout == "test":
        write_dataset_keys(root, list(written))
    write_calib_matrices(root / "calib_matrix.csv", np.diag([0.2, 0.3, 1, 1]), REAL_CALIB_R_T)
    return written


@pytest.mark.parametrize("layout,landmark_folder", [("train", "landmarks"), ("test", "landmarks"), ("test", "landmark")])
def test_round_trip(tmp_path, layout, landmark_folder):
    written = build_dataset(tmp_path, layout, landmark_folder)
    assert detect_layout(tmp_path) == layout
    refs = find_scans(tmp_path)
    assert [ref.key for ref in refs] == sorted(written, key=lambda k: (int(k[3:6]), k.split("__")[1]))
    assert [ref.subject for ref in refs] == [0, 0, 3, 3, 3, 12]
    assert refs[-1].subject_folder == "012"
    for ref in refs:
        frames, tforms, landmarks = written[ref.key]
        assert ref.landmark_path == tmp_path / landmark_folder / f"landmark_{ref.subject:03d}.h5"
        if layout == "train":
            assert ref.frames_path == ref.tforms_path == tmp_path / "frames_transfs" / ref.subject_folder / f"{ref.name}.h5"
        else:
            assert ref.frames_path == tmp_path / "frames" / ref.subject_folder / f"{ref.name}.h5"
            assert ref.tforms_path == tmp_path / "transfs" / ref.subject_folder / f"{ref.name}.h5"
        scan = read_scan(ref)
        assert scan.frames.dtype == np.uint8 and np.array_equal(scan.frames, frames)
        assert scan.tforms.dtype == np.float32 and np.array_equal(scan.tforms, tforms)
        assert scan.landmarks.dtype == np.int64 and np.array_equal(scan.landmarks, landmarks)
        assert (scan.name, scan.subject, scan.key, scan.num_frames, scan.frame_size) == (
            ref.name, ref.subject, ref.key, len(frames), (HEIGHT, WIDTH),
        )
    # No temporaries left behind by the atomic writers.
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_official_reading_of_written_files(tmp_path):
    # Read as the official code does: keys from dataset_keys.h5, paths from the key, '%03d' landmarks.
    written = build_dataset(tmp_path, "test", "landmark")
    with h5py.File(tmp_path / "dataset_keys.h5", "r") as keys:
        names = list(keys.keys())
    assert sorted(names) == sorted(written)
    for key in names:
        folder, name = key.split("__")[0][3:], key.split("__")[1]
        frames = h5py.File(tmp_path / "frames" / folder / f"{name}.h5", "r")["frames"][()]
        tforms = h5py.File(tmp_path / "transfs" / folder / f"{name}.h5", "r")["tforms"][()]
        landmark = h5py.File(tmp_path / "landmark" / ("landmark_%03d.h5" % int(folder)), "r")[name][()]
        assert np.array_equal(frames, written[key][0]) and np.array_equal(tforms, written[key][1])
        assert np.array_equal(landmark, written[key][2])
    torch.testing.assert_close(read_calib_matrices(tmp_path / "calib_matrix.csv")[1], torch.tensor(REAL_CALIB_R_T, dtype=torch.float32))


def test_float64_tforms_are_read_as_stored(tmp_path):
    rng = np.random.default_rng(1)
    frames, tforms, _ = make_scan(rng, 5)
    path = tmp_path / "frames_transfs" / "000" / "scan.h5"
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as handle:
        handle["frames"] = frames
        handle["tforms"] = tforms.astype(np.float64)
    (ref,) = find_scans(tmp_path)
    assert ref.landmark_path is None
    scan = read_scan(ref)
    assert scan.tforms.dtype == np.float64 and scan.landmarks is None


def test_scan_file_reads_windows(tmp_path):
    build_dataset(tmp_path, "test")
    ref = find_scans(tmp_path)[2]
    full = read_scan(ref).frames
    with ScanFile(ref) as scan:
        assert scan.num_frames == len(full) and scan.frame_size == (HEIGHT, WIDTH)
        assert np.array_equal(scan.read_frames(range(1, 4)), full[1:4])
        assert np.array_equal(scan.read_frames([3, 0, 3, 1]), full[[3, 0, 3, 1]])
        assert np.array_equal(scan.read_frames(slice(0, None, 2)), full[::2])
        assert np.array_equal(scan.read_frames(), full)
        assert scan.read_frames([]).shape == (0, HEIGHT, WIDTH)
        assert np.array_equal(scan.read_tforms(), read_scan(ref).tforms)
        with pytest.raises(ValueError, match=rf"{ref.frames_path}: frame index {len(full)} outside 0..{len(full) - 1}"):
            scan.read_frames([0, len(full)])
    assert not scan._frames_file.id.valid  # closed on exit


# --------------------------------------------------------------------------------------------
# Discovery errors
# --------------------------------------------------------------------------------------------


def test_no_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: not a TUS-REC dataset root.*frames_transfs/.*dataset_keys.h5"):
        find_scans(tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        find_scans(tmp_path / "missing")


def test_both_layouts_is_ambiguous(tmp_path):
    build_dataset(tmp_path, "test")
    (tmp_path / "frames_transfs").mkdir()
    with pytest.raises(ValueError, match="both frames_transfs/"):
        find_scans(tmp_path)


def test_empty_train_layout(tmp_path):
    (tmp_path / "frames_transfs" / "000").mkdir(parents=True)
    with pytest.raises(ValueError, match="no scans found"):
        find_scans(tmp_path)


def test_non_numeric_subject_folder(tmp_path):
    build_dataset(tmp_path, "train")
    (tmp_path / "frames_transfs" / "extra").mkdir()
    with pytest.raises(ValueError, match="'extra'"):
        find_scans(tmp_path)


def test_listed_scan_missing_file(tmp_path):
    build_dataset(tmp_path, "test")
    missing = tmp_path / "transfs" / "003" / "RH_Per_S_PtD.h5"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=rf"'sub003__RH_Per_S_PtD' is listed but its file {missing} does not exist"):
        find_scans(tmp_path)


def test_malformed_dataset_key(tmp_path):
    build_dataset(tmp_path, "test")
    with h5py.File(tmp_path / "dataset_keys.h5", "a") as handle:
        handle["subject3_scan"] = "x"
    with pytest.raises(ValueError, match="'subject3_scan' is not of the form"):
        find_scans(tmp_path)


# --------------------------------------------------------------------------------------------
# Content errors: one scan file written by hand per case
# --------------------------------------------------------------------------------------------


def write_raw(root, datasets, landmarks=None):
    """A one-scan train-layout root with the given datasets (no validation); returns its ScanRef."""
    path = root / "frames_transfs" / "005" / "scan.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        for key, value in datasets.items():
            handle[key] = value
    if landmarks is not None:
        (root / "landmarks").mkdir(exist_ok=True)
        with h5py.File(root / "landmarks" / "landmark_005.h5", "w") as handle:
            for key, value in landmarks.items():
                handle[key] = value
    (ref,) = find_scans(root)
    return ref


def good(num_frames=5):
    frames, tforms, landmarks = make_scan(np.random.default_rng(2), num_frames)
    return frames, tforms, landmarks


def expect_error(root, datasets, pattern, landmarks=None, error=ValueError):
    ref = write_raw(root, datasets, landmarks)
    with pytest.raises(error, match=pattern) as info:
        read_scan(ref)
    assert str(root) in str(info.value)
    return info


def test_missing_frames_key(tmp_path):
    _, tforms, _ = good()
    expect_error(tmp_path, {"tforms": tforms}, r"scan.h5: no dataset 'frames' \(found \['tforms'\]\)")


def test_missing_tforms_key(tmp_path):
    frames, _, _ = good()
    expect_error(tmp_path, {"frames": frames}, r"scan.h5: no dataset 'tforms' \(found \['frames'\]\)")


def test_missing_scan_file(tmp_path):
    ref = write_raw(tmp_path, dict(zip(("frames", "tforms"), good()[:2])))
    ref.frames_path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"scan file not found: {ref.frames_path}"):
        read_scan(ref)


def test_frames_not_uint8(tmp_path):
    frames, tforms, _ = good()
    expect_error(tmp_path, {"frames": frames.astype(np.float32), "tforms": tforms}, r"scan.h5: 'frames' must be uint8 .* got dtype float32")


def test_frames_not_3d(tmp_path):
    frames, tforms, _ = good()
    expect_error(tmp_path, {"frames": frames[..., None], "tforms": tforms}, r"'frames' must be 3-D \[N, H, W\], got shape \(5, 6, 10, 1\)")


def test_tforms_wrong_shape(tmp_path):
    frames, tforms, _ = good()
    expect_error(tmp_path, {"frames": frames, "tforms": tforms[:, :3, :]}, r"scan.h5: 'tforms' must be \[N, 4, 4\], got shape \(5, 3, 4\)")


def test_tforms_not_float(tmp_path):
    frames, tforms, _ = good()
    expect_error(tmp_path, {"frames": frames, "tforms": tforms.astype(np.int32)}, r"'tforms' must be float32 or float64, got dtype int32")


def test_count_mismatch(tmp_path):
    frames, tforms, _ = good()
    expect_error(tmp_path, {"frames": frames, "tforms": tforms[:4]}, r"'tforms' holds 4 poses but 'frames' holds 5 frames")


def test_non_finite_pose(tmp_path):
    frames, tforms, _ = good()
    tforms[3, 1, 2] = np.nan
    expect_error(tmp_path, {"frames": frames, "tforms": tforms}, r"scan.h5: 'tforms' has non-finite values at frame 3")


def test_last_row(tmp_path):
    frames, tforms, _ = good()
    tforms[2, 3] = [0, 0, 1, 1]
    expect_error(tmp_path, {"frames": frames, "tforms": tforms}, r"'tforms' frame 2 has last row \[0.0, 0.0, 1.0, 1.0\], expected \[0, 0, 0, 1\]")


def test_rotation_not_orthonormal(tmp_path):
    frames, tforms, _ = good()
    tforms[1, :3, :3] *= 1.01  # a 1% scale: R^T R - I = 0.0201 on the diagonal
    expect_error(tmp_path, {"frames": frames, "tforms": tforms}, rf"'tforms' frame 1 is not a rigid pose: max \|R\^T R - I\| = 0.0201 > {POSE_ORTHONORMAL_TOLERANCE:g}")


def test_rotation_reflection(tmp_path):
    frames, tforms, _ = good()
    tforms[4, :3, 0] *= -1
    expect_error(tmp_path, {"frames": frames, "tforms": tforms}, r"'tforms' frame 4 has a rotation with det = -1")


def test_pose_tolerance_accepts_float32_noise(tmp_path):
    frames, tforms, _ = good()
    tforms[1, :3, :3] *= 1 + 0.2 * POSE_ORTHONORMAL_TOLERANCE
    read_scan(write_raw(tmp_path, {"frames": frames, "tforms": tforms}))


def test_missing_landmark_dataset(tmp_path):
    frames, tforms, landmarks = good()
    expect_error(tmp_path, {"frames": frames, "tforms": tforms}, r"landmark_005.h5: no landmark dataset 'scan' \(found \['other'\]\)", {"other": landmarks})


def test_missing_landmark_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"landmark file not found: .*landmark_009.h5"):
        read_landmarks(tmp_path / "landmarks" / "landmark_009.h5", "scan", 5, HEIGHT, WIDTH)


def test_landmarks_not_int(tmp_path):
    frames, tforms, landmarks = good()
    expect_error(tmp_path, {"frames": frames, "tforms": tforms}, r"landmark_005.h5 \['scan'\]: landmarks must be integers, got dtype float64", {"scan": landmarks.astype(np.float64)})


def test_landmarks_wrong_shape(tmp_path):
    frames, tforms, landmarks = good()
    expect_error(tmp_path, {"frames": frames, "tforms": tforms}, r"landmark_005.h5 \['scan'\]: landmarks must be \[K, 3\] \(frame from 0, x from 1, y from 1\), got shape \(3, 5\)", {"scan": landmarks.T})


@pytest.mark.parametrize(
    "column,value,pattern",
    [
        (0, 0, r"has frame index 0, expected 1..4 \(frame 0 has no displacement field row"),
        (0, 5, r"has frame index 5, expected 1..4"),
        (1, 0, r"has x 0, expected 1..10 \(x counts columns from 1 to W=10;"),
        (1, 11, r"has x 11, expected 1..10"),
        (2, 0, r"has y 0, expected 1..6 \(y counts rows from 1 to H=6;"),
        (2, 7, r"has y 7, expected 1..6"),
    ],
    ids=["frame0", "frameN", "x0", "xW+1", "y0", "yH+1"],
)
def test_landmark_out_of_range(tmp_path, column, value, pattern):
    frames, tforms, landmarks = good()
    landmarks[3, column] = value
    expect_error(tmp_path, {"frames": frames, "tforms": tforms}, r"landmark_005.h5 \['scan'\]: landmark row 3 .*" + pattern, {"scan": landmarks})


def test_writers_refuse_what_readers_refuse(tmp_path):
    frames, tforms, landmarks = good()
    with pytest.raises(ValueError, match="must be uint8"):
        write_scan(tmp_path, 0, "scan", frames.astype(np.int16), tforms)
    bad = tforms.copy()
    bad[2, :3, :3] *= 2
    with pytest.raises(ValueError, match="frame 2 is not a rigid pose"):
        write_scan(tmp_path, 0, "scan", frames, bad)
    with pytest.raises(ValueError, match="layout='val' is not one of"):
        write_scan(tmp_path, 0, "scan", frames, tforms, layout="val")
    landmarks[0, 0] = 0
    with pytest.raises(ValueError, match="frame 0 has no displacement field row"):
        write_landmarks(tmp_path, 0, {"scan": landmarks})
    with pytest.raises(ValueError, match="not of the form"):
        write_dataset_keys(tmp_path, ["000__scan"])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# The real PLUS scans
# --------------------------------------------------------------------------------------------


REAL_ROOTS = ("plus_spine_phantom", "plus_bone_l14")


@pytest.mark.parametrize("name", REAL_ROOTS)
def test_real_plus_scans(realdata_dir, name):
    root = realdata_dir / name
    assert detect_layout(root) == "train"
    (ref,) = find_scans(root)
    assert ref.subject == 0 and ref.landmark_path is None
    scan = read_scan(ref)
    assert scan.frames.shape == (21, 616, 820) and scan.frames.dtype == np.uint8
    assert scan.tforms.shape == (21, 4, 4) and scan.tforms.dtype == np.float32
    assert scan.landmarks is None
    with ScanFile(ref) as scan_file:
        assert scan_file.frame_size == (616, 820)
        assert np.array_equal(scan_file.read_frames([20, 7, 8]), scan.frames[[20, 7, 8]])

    calibration = load_calibration(root / "calib_matrix.csv")
    tforms64 = scan.tforms.astype(np.float64)
    calib64 = torch.tensor(calibration.calib_R_T)
    glob = global_transforms(torch.tensor(tforms64), calib64).numpy()
    loc = local_transforms(torch.tensor(tforms64), calib64).numpy()
    assert glob.shape == loc.shape == (20, 4, 4)
    for i in (1, 2, 10, 20):
        # T_{0<-i} = C^-1 tforms[0]^-1 tforms[i] C, and T_{i-1<-i}; rows are i-1.
        np.testing.assert_allclose(glob[i - 1], frame_to_frame(tforms64, calibration.calib_R_T, 0, i), rtol=0, atol=1e-9)
        np.testing.assert_allclose(loc[i - 1], frame_to_frame(tforms64, calibration.calib_R_T, i - 1, i), rtol=0, atol=1e-9)
    # And the float32 path the training code takes agrees to float32 precision.
    _, calib32, _ = read_calib_matrices(root / "calib_matrix.csv")
    glob32 = global_transforms(torch.from_numpy(scan.tforms), calib32).numpy()
    np.testing.assert_allclose(glob32, glob, rtol=0, atol=1e-3)
