"""calib_matrix.csv: the official reader's numbers, our validation, and a writer both can read."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import REAL_CALIB_R_T, REAL_SCALE, rigid
from utils.calibration import (
    CALIB_R_T_NAME,
    ROTATION_TOLERANCE,
    SCALE_NAME,
    default_calibration,
    load_calibration,
    read_calib_matrices,
    write_calib_matrices,
)


def official_read_calib_matrices(filename_calib):
    """A faithful re-implementation of the official reader: rows by line number, float32 numpy."""
    tform_calib = np.empty((8, 4), np.float32)
    with open(filename_calib) as csv_file:
        txt = [line.strip("\n").split(",") for line in csv_file.readlines()]
    tform_calib[0:4, :] = np.array(txt[1:5]).astype(np.float32)
    tform_calib[4:8, :] = np.array(txt[6:10]).astype(np.float32)
    return (
        torch.tensor(tform_calib[0:4, :]),
        torch.tensor(tform_calib[4:8, :]),
        torch.tensor(tform_calib[4:8, :] @ tform_calib[0:4, :]),
    )


def public_file_text():
    """The public calibration in the challenge's own spelling (values as DESIGN.md gives them)."""
    return (
        "scaling_from_pixel_to_mm\n"
        "0.229389190673828,0,0,0\n"
        "0,0.220979690551758,0,0\n"
        "0,0,1,0\n"
        "0,0,0,1\n"
        "spatial_calibration_from_image_coordinate_system_to_tracking_tool_coordinate_system\n"
        "0.231064671309448,-0.218052035,0.948189025293473,-70.74132919\n"
        "-0.190847036,-0.965787273,-0.175591436,-80.6505661\n"
        "0.954036962825936,-0.140386088,-0.264773903,-46.17662239\n"
        "0,0,0,1\n"
    )


@pytest.fixture
def public_csv(tmp_path):
    path = tmp_path / "calib_matrix.csv"
    path.write_text(public_file_text())
    return path


def assert_bitwise_equal(ours, theirs):
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float32 and a.shape == (4, 4)
        assert torch.equal(a, b)


def test_read_calib_matrices_equals_official_reader(public_csv):
    ours = read_calib_matrices(public_csv)
    assert_bitwise_equal(ours, official_read_calib_matrices(public_csv))
    torch.testing.assert_close(ours[0], torch.tensor(REAL_SCALE, dtype=torch.float32))
    torch.testing.assert_close(ours[1], torch.tensor(REAL_CALIB_R_T, dtype=torch.float32))


def test_load_calibration_float64_and_product(public_csv):
    calibration = load_calibration(public_csv)
    assert calibration.scale.dtype == np.float64 and calibration.calib_R_T.dtype == np.float64
    np.testing.assert_array_equal(calibration.scale, REAL_SCALE)
    np.testing.assert_array_equal(calibration.calib_R_T, REAL_CALIB_R_T)
    np.testing.assert_array_equal(calibration.calib, REAL_CALIB_R_T @ REAL_SCALE)
    assert calibration.pixel_size_mm == (0.229389190673828, 0.220979690551758)
    s, c, cs = calibration.as_tensors(torch.float64)
    assert torch.equal(cs, c @ s) and cs.dtype == torch.float64


def test_default_calibration_is_the_public_one():
    calibration = default_calibration()
    np.testing.assert_array_equal(calibration.scale, REAL_SCALE)
    np.testing.assert_array_equal(calibration.calib_R_T, REAL_CALIB_R_T)
    with pytest.raises(ValueError):
        calibration.scale[0, 0] = 1.0  # shared constants are read-only


def test_write_round_trip_public(tmp_path, public_csv):
    path = tmp_path / "out" / "calib_matrix.csv"
    calibration = default_calibration()
    write_calib_matrices(path, calibration.scale, calibration.calib_R_T)
    assert [p.name for p in path.parent.iterdir()] == ["calib_matrix.csv"]  # no temporary left
    lines = path.read_text().splitlines()
    assert lines[0] == SCALE_NAME and lines[5] == CALIB_R_T_NAME and len(lines) == 10
    reread = load_calibration(path)
    np.testing.assert_array_equal(reread.scale, calibration.scale)
    np.testing.assert_array_equal(reread.calib_R_T, calibration.calib_R_T)
    # The official reader reads our file exactly as it reads the challenge's own spelling.
    assert_bitwise_equal(official_read_calib_matrices(path), official_read_calib_matrices(public_csv))
    assert_bitwise_equal(read_calib_matrices(path), official_read_calib_matrices(path))


@settings(max_examples=40, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    translation=st.tuples(*[st.floats(-500, 500)] * 3),
    sx=st.floats(1e-3, 2.0),
    sy=st.floats(1e-3, 2.0),
    as_float32=st.booleans(),
)
def test_write_round_trip_full_precision(tmp_path_factory, angles, translation, sx, sy, as_float32):
    scale = np.diag([sx, sy, 1.0, 1.0])
    calib_r_t = rigid(*angles, translation)
    if as_float32:  # torch float32 input, as a training script would pass
        scale, calib_r_t = torch.tensor(scale, dtype=torch.float32), torch.tensor(calib_r_t, dtype=torch.float32)
    path = tmp_path_factory.mktemp("calib") / "calib_matrix.csv"
    write_calib_matrices(path, scale, calib_r_t)
    expected_scale = np.asarray(scale, dtype=np.float64)
    expected_calib = np.asarray(calib_r_t, dtype=np.float64)
    reread = load_calibration(path)
    np.testing.assert_array_equal(reread.scale, expected_scale)
    np.testing.assert_array_equal(reread.calib_R_T, expected_calib)
    official = official_read_calib_matrices(path)
    assert torch.equal(official[0], torch.tensor(expected_scale, dtype=torch.float32))
    assert torch.equal(official[1], torch.tensor(expected_calib, dtype=torch.float32))
    assert_bitwise_equal(read_calib_matrices(path), official)


def test_accepts_what_the_official_reader_accepts(tmp_path):
    # A byte-order mark, Windows line ends, spaces around values and trailing blank lines.
    path = tmp_path / "calib_matrix.csv"
    text = "\ufeff" + public_file_text().replace(",", " , ").replace("\n", "\r\n") + "\r\n\r\n"
    path.write_bytes(text.encode())
    np.testing.assert_array_equal(load_calibration(path).calib_R_T, REAL_CALIB_R_T)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "calib_matrix.csv"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_calibration(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_calib_matrices(path)


def _replace_line(text, index, new):
    lines = text.splitlines()
    lines[index] = new
    return "\n".join(lines) + "\n"


# (description, edit of the public text, pattern the message must contain besides the file name)
MALFORMED = [
    ("first name", lambda t: _replace_line(t, 0, "scaling"), r"line 1: expected 'scaling_from_pixel_to_mm', got 'scaling'"),
    ("second name", lambda t: _replace_line(t, 5, "calibration"), r"line 6: expected 'spatial_calibration.*got 'calibration'"),
    ("too few lines", lambda t: "\n".join(t.splitlines()[:9]) + "\n", r"expected 10 lines .* got 9"),
    ("extra line", lambda t: t + "1,2,3,4\n", r"got 11; line 11 is '1,2,3,4'"),
    ("empty file", lambda t: "", r"got 0 \(empty file\)"),
    ("non-numeric", lambda t: _replace_line(t, 7, "-0.190847036,abc,-0.175591436,-80.6505661"), r"line 8: 'abc' is not a number"),
    ("empty value", lambda t: _replace_line(t, 2, "0,,0,0"), r"line 3: '' is not a number"),
    ("three values", lambda t: _replace_line(t, 3, "0,0,1"), r"line 4: expected 4 comma-separated numbers, got 3 field\(s\): '0,0,1'"),
    ("five values", lambda t: _replace_line(t, 9, "0,0,0,1,0"), r"line 10: expected 4 .* got 5 field\(s\): '0,0,0,1,0'"),
    ("semicolons", lambda t: _replace_line(t, 6, "1;0;0;0"), r"line 7: expected 4 .* got 1 field\(s\): '1;0;0;0'"),
    ("nan", lambda t: _replace_line(t, 1, "nan,0,0,0"), r"line 2: 'nan' is not finite"),
    ("S not diagonal", lambda t: _replace_line(t, 1, "0.229389190673828,0.01,0,0"), r"scaling_from_pixel_to_mm must be diagonal"),
    ("S negative", lambda t: _replace_line(t, 2, "0,-0.22,0,0"), r"positive x and y scales .* sy=-0.22"),
    ("S z scale", lambda t: _replace_line(t, 3, "0,0,2,0"), r"must end its diagonal with 1, 1 .* got 2.0, 1.0"),
    ("C last row", lambda t: _replace_line(t, 9, "0,0,1,1"), r"must have last row \[0, 0, 0, 1\], got \[0.0, 0.0, 1.0, 1.0\]"),
    ("C scaled", lambda t: _replace_line(t, 6, "0.462129342618896,-0.43610407,1.896378050586946,-70.74132919"), r"must be orthonormal .* max \|R\^T R - I\| = "),
    ("C reflection", lambda t: _replace_line(t, 8, "-0.954036962825936,0.140386088,0.264773903,-46.17662239"), r"must be proper \(det = \+1\), got det = -1"),
]


@pytest.mark.parametrize("edit,pattern", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_rejects_malformed(tmp_path, edit, pattern):
    path = tmp_path / "bad_calib_matrix.csv"
    path.write_text(edit(public_file_text()))
    for reader in (load_calibration, read_calib_matrices):
        with pytest.raises(ValueError, match=pattern) as info:
            reader(path)
        assert str(path) in str(info.value)


def test_rotation_tolerance_documented_value(tmp_path):
    # A rotation perturbed below the tolerance is accepted, above it refused.
    for epsilon, ok in ((0.2 * ROTATION_TOLERANCE, True), (5 * ROTATION_TOLERANCE, False)):
        calib = REAL_CALIB_R_T.copy()
        calib[0, 0] += epsilon
        path = tmp_path / f"calib_{ok}.csv"
        path.write_text(public_file_text())
        lines = path.read_text().splitlines()
        lines[6] = ",".join(repr(float(v)) for v in calib[0])
        path.write_text("\n".join(lines) + "\n")
        if ok:
            load_calibration(path)
        else:
            with pytest.raises(ValueError, match="orthonormal"):
                load_calibration(path)


def test_writer_refuses_invalid_matrices(tmp_path):
    path = tmp_path / "calib_matrix.csv"
    with pytest.raises(ValueError, match="4x4"):
        write_calib_matrices(path, np.eye(3), REAL_CALIB_R_T)
    with pytest.raises(ValueError, match="orthonormal"):
        write_calib_matrices(path, REAL_SCALE, np.diag([2.0, 1.0, 1.0, 1.0]) @ REAL_CALIB_R_T)
    assert not path.exists() and list(tmp_path.iterdir()) == []
