"""DDFs (utils/Transf2DDFs.py) against the independent float64 formulas of tests/reference.py.

Transforms come from the geometry module (as in the pipeline); every expected value comes from
reference.py. Images are non-square so that an x/y swap cannot pass.
"""

import tracemalloc

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from utils import Transf2DDFs
from utils.Transf2DDFs import cal_global_ddfs, cal_local_ddfs, write_ddfs
from utils.transform import global_transforms, local_transforms, reference_image_points

TOL_MM = 1e-4
SCALE = torch.from_numpy(ref.REAL_SCALE)


def scan(seed, num_frames, height, width, dtype=torch.float32):
    """(tforms float64 numpy, global, local transforms as torch ``dtype`` [N-1, 4, 4])."""
    tforms = ref.random_tforms(np.random.default_rng(seed), num_frames)
    calib = torch.from_numpy(ref.REAL_CALIB_R_T)
    tforms_t = torch.from_numpy(tforms)
    return tforms, global_transforms(tforms_t, calib).to(dtype), local_transforms(tforms_t, calib).to(dtype)


def grid(height, width):
    return reference_image_points([height, width], [height, width])


def corner_landmarks(num_frames, height, width):
    """Corners, a middle pixel and the first and last frames: where off-by-one and x/y errors show."""
    return np.array([[1, 1, 1], [num_frames - 1, width, height], [1, width, 1], [num_frames - 1, 1, height],
                     [num_frames // 2, width // 2, height // 3]])


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", [cal_global_ddfs, cal_local_ddfs])
def test_identity_gives_zero_fields(function):
    height, width, num_frames = 7, 11, 4
    eye = torch.eye(4).repeat(num_frames - 1, 1, 1)
    fields, landmark_fields = function(eye, SCALE.float(), grid(height, width),
                                       corner_landmarks(num_frames, height, width), width, height)
    assert fields.shape == (num_frames - 1, 3, height * width) and fields.dtype == np.float32
    assert landmark_fields.shape == (3, 5) and landmark_fields.dtype == np.float32
    assert not fields.any() and not landmark_fields.any()


def test_translation_gives_constant_field():
    height, width = 7, 11
    shifts = torch.tensor([[1.5, -2.0, 0.25], [0.0, 3.0, -7.0]])
    tforms = torch.eye(4).repeat(2, 1, 1)
    tforms[:, :3, 3] = shifts
    fields, landmark_fields = cal_global_ddfs(tforms, SCALE.float(), grid(height, width), np.array([[2, 11, 7]]),
                                              width, height)
    expected = np.broadcast_to(shifts.numpy()[:, :, None], fields.shape)
    np.testing.assert_allclose(fields, expected, atol=1e-6)
    np.testing.assert_allclose(landmark_fields[:, 0], shifts[1].numpy(), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("height, width", [(7, 11), (30, 40), (40, 30)])
def test_random_scans_match_reference(height, width, dtype):
    num_frames = 6
    tforms, glob, loc = scan(height * width, num_frames, height, width, dtype)
    gp_ref, lp_ref = ref.scan_ddfs(tforms, ref.REAL_CALIB_R_T, ref.REAL_SCALE, height, width)
    landmarks = corner_landmarks(num_frames, height, width)
    gp, gl = cal_global_ddfs(glob, SCALE.to(dtype), grid(height, width), landmarks, w=width, h=height)
    lp, ll = cal_local_ddfs(loc, SCALE.to(dtype), grid(height, width), landmarks, w=width, h=height)
    np.testing.assert_allclose(gp, gp_ref, rtol=0, atol=TOL_MM)
    np.testing.assert_allclose(lp, lp_ref, rtol=0, atol=TOL_MM)
    np.testing.assert_allclose(gl, ref.landmark_ddfs(gp_ref, landmarks, width), rtol=0, atol=TOL_MM)
    np.testing.assert_allclose(ll, ref.landmark_ddfs(lp_ref, landmarks, width), rtol=0, atol=TOL_MM)


def test_landmarks_equal_pixel_fields_exactly():
    height, width, num_frames = 30, 40, 9
    _, glob, loc = scan(1, num_frames, height, width)
    rng = np.random.default_rng(2)
    landmarks = np.concatenate([
        corner_landmarks(num_frames, height, width),
        np.stack([rng.integers(1, num_frames, 50), rng.integers(1, width + 1, 50), rng.integers(1, height + 1, 50)], 1),
    ])
    for function, tforms in ((cal_global_ddfs, glob), (cal_local_ddfs, loc)):
        fields, landmark_fields = function(tforms, SCALE.float(), grid(height, width), landmarks, width, height)
        for column, (frame, x, y) in enumerate(landmarks):
            # 1-based x (column) and y (row); frame f's field is row f-1.
            np.testing.assert_array_equal(landmark_fields[:, column], fields[frame - 1, :, (y - 1) * width + x - 1])
        np.testing.assert_array_equal(landmark_fields, ref.landmark_ddfs(fields, landmarks, width))


def test_torch_landmarks_and_default_size():
    """Full 480x640 with the default w, h, torch int landmarks, as the challenge calls it."""
    height, width, num_frames = 480, 640, 3
    tforms, glob, _ = scan(3, num_frames, height, width)
    landmarks = torch.tensor([[1, 640, 1], [2, 1, 480], [2, 320, 240]])
    gp, gl = cal_global_ddfs(glob, SCALE.float(), grid(height, width), landmarks)
    gp_ref, _ = ref.scan_ddfs(tforms, ref.REAL_CALIB_R_T, ref.REAL_SCALE, height, width)
    np.testing.assert_allclose(gp, gp_ref, rtol=0, atol=TOL_MM)
    np.testing.assert_allclose(gl, ref.landmark_ddfs(gp_ref, landmarks.numpy(), width), rtol=0, atol=TOL_MM)


@pytest.mark.parametrize("chunk_frames", [1, 2, 5, 100])
def test_chunking_does_not_change_values(chunk_frames):
    height, width, num_frames = 7, 11, 8
    _, glob, _ = scan(4, num_frames, height, width)
    landmarks = corner_landmarks(num_frames, height, width)
    expected = cal_global_ddfs(glob, SCALE.float(), grid(height, width), landmarks, width, height)
    got = cal_global_ddfs(glob, SCALE.float(), grid(height, width), landmarks, width, height, chunk_frames=chunk_frames)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("kind", ["random", "reversed_grid"])
def test_non_grid_points_are_transformed_as_given(kind):
    height, width, num_frames = 7, 11, 4
    tforms, glob, _ = scan(5, num_frames, height, width)
    if kind == "random":
        rng = np.random.default_rng(6)
        points = np.stack([rng.uniform(-50, 700, height * width), rng.uniform(-50, 500, height * width),
                           rng.uniform(-5, 5, height * width), np.ones(height * width)])
    else:  # the right values in another order: must not be mistaken for the official grid
        points = ref.pixel_grid(height, width)[:, ::-1].copy()
    landmarks = corner_landmarks(num_frames, height, width)
    fields, landmark_fields = cal_global_ddfs(glob, SCALE.float(), torch.from_numpy(points).float(), landmarks,
                                              width, height)
    transforms = [ref.frame_to_frame(tforms, ref.REAL_CALIB_R_T, 0, i) for i in range(1, num_frames)]
    expected = np.stack([ref.ddf_points(t, ref.REAL_SCALE, points) for t in transforms])
    np.testing.assert_allclose(fields, expected, rtol=0, atol=TOL_MM)
    # The official code reads landmark l at flat index (y-1)*w + x-1 of whatever points it was given.
    np.testing.assert_allclose(landmark_fields, ref.landmark_ddfs(expected, landmarks, width), rtol=0, atol=TOL_MM)


@settings(max_examples=30, deadline=None)
@given(
    angles=st.lists(st.floats(-np.pi, np.pi), min_size=3, max_size=3),
    shift=st.lists(st.floats(-300, 300), min_size=3, max_size=3),
)
def test_any_rigid_transform_matches_reference(angles, shift):
    height, width = 5, 9
    transform = ref.rigid(*angles, shift)
    fields, _ = cal_local_ddfs(torch.from_numpy(transform)[None], SCALE, grid(height, width), np.zeros((0, 3), int),
                               width, height)
    np.testing.assert_allclose(fields[0], ref.ddf(transform, ref.REAL_SCALE, height, width), rtol=0, atol=TOL_MM)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    height, width, num_frames = 30, 40, 12
    _, glob, _ = scan(7, num_frames, height, width)
    landmarks = corner_landmarks(num_frames, height, width)
    cpu = cal_global_ddfs(glob, SCALE.float(), grid(height, width), landmarks, width, height)
    gpu = cal_global_ddfs(glob.cuda(), SCALE.float().cuda(), grid(height, width).cuda(), landmarks, width, height,
                          chunk_frames=5)
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(gpu[1], cpu[1])


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "landmark, match",
    [
        ([[0, 3, 3]], r"has frame index 0"),  # frame 0: the official code would read the last frame
        ([[4, 3, 3]], r"has frame index 4, expected 1\.\.3"),  # N = 4 frames
        ([[1, 0, 3]], r"has x 0, expected 1\.\.11"),
        ([[1, 12, 3]], r"has x 12, expected 1\.\.11"),
        ([[1, 3, 0]], r"has y 0, expected 1\.\.7"),
        ([[1, 3, 8]], r"has y 8, expected 1\.\.7"),
        ([[1, 3]], r"shape \(1, 2\)"),
        ([1, 3, 3], r"shape \(3,\)"),
        ([[1.5, 3, 3]], r"non-integer"),
    ],
)
def test_bad_landmarks_raise(landmark, match):
    height, width, num_frames = 7, 11, 4
    _, glob, _ = scan(8, num_frames, height, width)
    with pytest.raises(ValueError, match=match):
        cal_global_ddfs(glob, SCALE.float(), grid(height, width), np.array(landmark), width, height)


def test_bad_shapes_raise():
    height, width = 7, 11
    eye = torch.eye(4).repeat(2, 1, 1)
    landmarks = np.array([[1, 1, 1]])
    with pytest.raises(ValueError, match=r"image_points has shape \(4, 77\); expected \[4, h\*w\] = \[4, 30\]"):
        cal_global_ddfs(eye, SCALE, grid(height, width), landmarks, w=5, h=6)
    with pytest.raises(ValueError, match=r"transformation_local has shape \(2, 3, 4\)"):
        cal_local_ddfs(eye[:, :3], SCALE, grid(height, width), landmarks, width, height)
    with pytest.raises(ValueError, match=r"tform_calib_scale has shape \(3, 3\)"):
        cal_local_ddfs(eye, SCALE[:3, :3], grid(height, width), landmarks, width, height)
    with pytest.raises(ValueError, match="chunk_frames=0"):
        cal_local_ddfs(eye, SCALE, grid(height, width), landmarks, width, height, chunk_frames=0)


# --------------------------------------------------------------------------------------------
# Streaming writer
# --------------------------------------------------------------------------------------------


def read_fields(path, fmt):
    if fmt == "h5":
        with h5py.File(path, "r") as file:
            return {name: file[name][()] for name in file}
    return {p.stem: np.load(p) for p in path.iterdir()}


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_streaming_equals_in_memory(tmp_path, fmt):
    height, width, num_frames = 30, 40, 11
    _, glob, loc = scan(9, num_frames, height, width)
    landmarks = corner_landmarks(num_frames, height, width)
    path = write_ddfs(tmp_path / f"scan.{fmt}", glob, loc, SCALE.float(), landmarks, width, height, fmt=fmt,
                      chunk_frames=3)
    got = read_fields(path, fmt)
    assert sorted(got) == ["GL", "GP", "LL", "LP"]
    gp, gl = cal_global_ddfs(glob, SCALE.float(), grid(height, width), landmarks, width, height)
    lp, ll = cal_local_ddfs(loc, SCALE.float(), grid(height, width), landmarks, width, height)
    for name, expected in {"GP": gp, "GL": gl, "LP": lp, "LL": ll}.items():
        assert got[name].dtype == np.float32 and got[name].shape == expected.shape, name
        np.testing.assert_array_equal(got[name], expected, err_msg=name)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_streaming_without_landmarks_and_overwrite(tmp_path, fmt):
    height, width, num_frames = 7, 11, 5
    _, glob, loc = scan(10, num_frames, height, width)
    path = tmp_path / f"scan.{fmt}"
    write_ddfs(path, glob, loc, SCALE, None, width, height, fmt=fmt)
    write_ddfs(path, glob, None, SCALE, None, width, height, fmt=fmt)  # replaces the previous result
    got = read_fields(path, fmt)
    assert sorted(got) == ["GP"]
    np.testing.assert_array_equal(got["GP"], cal_global_ddfs(glob, SCALE, grid(height, width), np.zeros((0, 3), int),
                                                             width, height)[0])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("fmt", ["h5", "npy"])
@pytest.mark.parametrize("previous", [False, True])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, fmt, previous):
    height, width, num_frames = 7, 11, 9
    _, glob, loc = scan(11, num_frames, height, width)
    path = tmp_path / f"scan.{fmt}"
    if previous:
        write_ddfs(path, glob, loc, SCALE, None, width, height, fmt=fmt)
        before = read_fields(path, fmt)
    calls = []
    original = Transf2DDFs._Evaluator.fill

    def failing_fill(self, start, stop, out):
        calls.append(start)
        if len(calls) == 3:  # mid-way through the local fields, after GP was complete
            raise RuntimeError("disk full")
        return original(self, start, stop, out)

    monkeypatch.setattr(Transf2DDFs._Evaluator, "fill", failing_fill)
    with pytest.raises(RuntimeError, match="disk full"):
        write_ddfs(path, glob, loc, SCALE, np.array([[1, 1, 1]]), width, height, fmt=fmt, chunk_frames=4)
    if previous:
        after = read_fields(path, fmt)
        assert sorted(after) == sorted(before)
        for name in before:
            np.testing.assert_array_equal(after[name], before[name])
    else:
        assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ([path.name] if previous else [])


def traced_peak(function):
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_streaming_memory_does_not_grow_with_frames(tmp_path, fmt):
    height, width, chunk = 60, 80, 2
    frame_bytes = 3 * height * width * 4
    peaks = {}
    for num_frames in (6, 60):
        _, glob, loc = scan(12, num_frames, height, width)
        peaks[num_frames] = traced_peak(lambda: write_ddfs(tmp_path / f"{num_frames}.{fmt}", glob, loc, SCALE, None,
                                                           width, height, fmt=fmt, chunk_frames=chunk))
        assert peaks[num_frames] >= chunk * frame_bytes  # tracemalloc sees the numpy buffer
    assert peaks[60] < peaks[6] + frame_bytes, peaks
    assert peaks[60] < 0.2 * 59 * frame_bytes, peaks
    # Control: the in-memory function's peak does grow with N (its output), so the probe is live.
    _, glob, _ = scan(12, 60, height, width)
    in_memory = traced_peak(lambda: cal_global_ddfs(glob, SCALE, grid(height, width), np.zeros((0, 3), int), width,
                                                    height))
    assert in_memory >= 59 * frame_bytes


def test_bad_writer_arguments(tmp_path):
    eye = torch.eye(4).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="fmt='zarr'"):
        write_ddfs(tmp_path / "x", eye, eye, SCALE, None, 11, 7, fmt="zarr")
    with pytest.raises(ValueError, match="differ in frame count"):
        write_ddfs(tmp_path / "x.h5", eye, eye[:1], SCALE, None, 11, 7)
    with pytest.raises(ValueError, match="both None"):
        write_ddfs(tmp_path / "x.h5", None, None, SCALE, None, 11, 7)
    with pytest.raises(ValueError, match=r"frame index .* 0"):
        write_ddfs(tmp_path / "x.h5", eye, eye, SCALE, np.array([[0, 1, 1]]), 11, 7)
    assert not any(tmp_path.iterdir())
