"""Geometry: parameterisations, inverses, relative and chained transforms against float64 formulas."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import reference as ref
from utils import transform as tf

# Keep a_Y away from +-pi/2 (gimbal lock: a_Z and a_X are then not unique) and the other two away
# from +-pi (the wrap point), so the round trip must return the same numbers.
angle_z = st.floats(-3.1, 3.1)
angle_y = st.floats(-1.5, 1.5)
angle_x = st.floats(-3.1, 3.1)
mm = st.floats(-300, 300)
params_strategy = st.tuples(angle_z, angle_y, angle_x, mm, mm, mm)
quat_component = st.floats(-1, 1)


def as_t(array):
    return torch.as_tensor(np.asarray(array), dtype=torch.float64)


@given(params_strategy)
def test_params_to_matrix_is_intrinsic_zyx(params):
    expected = ref.rigid(*params[:3], params[3:])
    assert_close(tf.params_to_matrix(as_t(params)), as_t(expected), atol=1e-12, rtol=0)


@given(params_strategy)
def test_params_matrix_round_trip(params):
    matrix = tf.params_to_matrix(as_t(params))
    assert_close(tf.matrix_to_params(matrix), as_t(params), atol=1e-9, rtol=0)


@given(st.tuples(quat_component, quat_component, quat_component, quat_component), st.tuples(mm, mm, mm))
def test_quaternion_to_matrix_matches_hamilton_formula(quat, translation):
    if np.linalg.norm(quat) < 1e-3:
        return  # no rotation is defined by a (near-)zero quaternion
    got = tf.quaternion_to_matrix(as_t(list(quat) + list(translation)))
    expected = np.eye(4)
    expected[:3, :3] = ref.quat_wxyz_to_rot(quat)
    expected[:3, 3] = translation
    assert_close(got, as_t(expected), atol=1e-9, rtol=0)


@given(params_strategy)
def test_matrix_quaternion_round_trip(params):
    matrix = as_t(ref.rigid(*params[:3], params[3:]))
    quaternion = tf.matrix_to_quaternion(matrix)
    assert quaternion[0] >= 0
    assert_close(torch.linalg.vector_norm(quaternion[:4]), torch.tensor(1.0, dtype=torch.float64))
    assert_close(tf.quaternion_to_matrix(quaternion), matrix, atol=1e-9, rtol=0)


@given(params_strategy)
def test_transform12_round_trip_is_row_major(params):
    matrix = as_t(ref.rigid(*params[:3], params[3:]))
    values = tf.matrix_to_transform12(matrix)
    assert_close(values, matrix[:3].reshape(12))
    assert_close(tf.transform12_to_matrix(values), matrix)


@given(params_strategy, params_strategy)
@settings(max_examples=50)
def test_inverse_and_composition_identities(p, q):
    a = as_t(ref.rigid(*p[:3], p[3:]))
    b = as_t(ref.rigid(*q[:3], q[3:]))
    eye = torch.eye(4, dtype=torch.float64)
    assert_close(tf.invert_rigid(a) @ a, eye, atol=1e-9, rtol=0)
    assert_close(a @ tf.invert_rigid(a), eye, atol=1e-9, rtol=0)
    assert_close(tf.invert_rigid(a @ b), tf.invert_rigid(b) @ tf.invert_rigid(a), atol=1e-9, rtol=0)
    assert_close(tf.invert_rigid(a), as_t(np.linalg.inv(a.numpy())), atol=1e-9, rtol=0)


@pytest.fixture(scope="module")
def scan():
    rng = np.random.default_rng(7)
    return ref.random_tforms(rng, 37)


def test_relative_transforms_match_formula(scan):
    pairs = [(0, 5), (5, 0), (3, 4), (36, 1), (7, 7)]
    got = tf.relative_transforms(as_t(scan), pairs, as_t(ref.REAL_CALIB_R_T))
    for k, (j, i) in enumerate(pairs):
        assert_close(got[k], as_t(ref.frame_to_frame(scan, ref.REAL_CALIB_R_T, j, i)), atol=1e-9, rtol=0)
    assert_close(got[4], torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_relative_transforms_batched_over_scans(scan):
    batch = as_t(np.stack([scan, scan[::-1].copy()]))
    got = tf.relative_transforms(batch, [(0, 2)], as_t(ref.REAL_CALIB_R_T))
    assert got.shape == (2, 1, 4, 4)
    reverse = scan[::-1]
    assert_close(got[1, 0], as_t(ref.frame_to_frame(reverse, ref.REAL_CALIB_R_T, 0, 2)), atol=1e-9, rtol=0)


def test_global_and_local_transforms(scan):
    calib = as_t(ref.REAL_CALIB_R_T)
    glob = tf.global_transforms(as_t(scan), calib)
    loc = tf.local_transforms(as_t(scan), calib)
    assert glob.shape == loc.shape == (36, 4, 4)
    for i in (1, 2, 17, 36):
        assert_close(glob[i - 1], as_t(ref.frame_to_frame(scan, ref.REAL_CALIB_R_T, 0, i)), atol=1e-9, rtol=0)
        assert_close(loc[i - 1], as_t(ref.frame_to_frame(scan, ref.REAL_CALIB_R_T, i - 1, i)), atol=1e-9, rtol=0)


@pytest.mark.parametrize("num_frames", [2, 3, 8, 37, 100])
def test_chaining_local_gives_global(num_frames):
    tforms = ref.random_tforms(np.random.default_rng(num_frames), num_frames)
    calib = as_t(ref.REAL_CALIB_R_T)
    chained = tf.chain_local_transforms(tf.local_transforms(as_t(tforms), calib))
    assert_close(chained, tf.global_transforms(as_t(tforms), calib), atol=1e-8, rtol=0)
    # and against a sequential product written out here
    running = np.eye(4)
    for i in range(1, num_frames):
        running = running @ ref.frame_to_frame(tforms, ref.REAL_CALIB_R_T, i - 1, i)
    assert_close(chained[-1], as_t(running), atol=1e-8, rtol=0)


def test_chaining_keeps_product_order():
    # Two non-commuting rotations: a wrong order would give a different matrix.
    a = as_t(ref.rigid(0.5, 0, 0, [1, 0, 0]))
    b = as_t(ref.rigid(0, 0, 0.7, [0, 2, 0]))
    chained = tf.chain_local_transforms(torch.stack([a, b]))
    assert_close(chained[1], a @ b)
    assert not torch.allclose(chained[1], b @ a)


def test_reference_image_points_official_order():
    height, width = 3, 5
    points = tf.reference_image_points([height, width], [height, width])
    assert points.shape == (4, height * width) and points.dtype == torch.float32
    k = torch.arange(height * width)
    assert_close(points[0], (k % width + 1).float())
    assert_close(points[1], (k // width + 1).float())
    assert_close(points[2:], torch.tensor([[0.0], [1.0]]).expand(2, height * width))
    np.testing.assert_array_equal(points.numpy().astype(np.float64), ref.pixel_grid(height, width))


def test_image_corners_order():
    corners = tf.image_corners([480, 640])
    expected = torch.tensor([[1, 640, 1, 640], [1, 1, 480, 480], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    assert_close(corners, expected)


def test_pred_label_combinations():
    tf.check_pred_label("parameter", "parameter")
    tf.check_pred_label("quaternion", "transform")
    with pytest.raises(ValueError, match=r"PRED_TYPE='point' cannot produce LABEL_TYPE='parameter'.*\['point'\]"):
        tf.check_pred_label("point", "parameter")
    with pytest.raises(ValueError, match=r"'transform' cannot produce LABEL_TYPE='parameter'"):
        tf.check_pred_label("transform", "parameter")
    with pytest.raises(ValueError, match="is not one of"):
        tf.check_pred_label("euler", "point")
    with pytest.raises(ValueError, match="is not one of"):
        tf.check_pred_label("parameter", "points")


def test_type_dim():
    assert tf.type_dim("parameter", 4, 1) == 6
    assert tf.type_dim("transform", 4, 2) == 24
    assert tf.type_dim("quaternion", 4, 3) == 21
    assert tf.type_dim("point", 4, 1) == 12


@pytest.mark.parametrize(
    "pred_type,label_type",
    [(p, l) for p, labels in tf.ALLOWED_PRED_LABEL.items() for l in labels],
)
def test_predictions_of_the_true_transform_equal_the_labels(pred_type, label_type):
    """Every allowed combination: a network that outputs the true pair transform reproduces the label."""
    tforms = ref.random_tforms(np.random.default_rng(3), 4)
    pairs = [(0, 1), (1, 3)]
    scale = as_t(ref.REAL_SCALE)
    points_mm = scale @ tf.image_corners([480, 640]).double()
    calib = as_t(ref.REAL_CALIB_R_T)
    truth = np.stack([ref.frame_to_frame(tforms, ref.REAL_CALIB_R_T, j, i) for j, i in pairs])
    labels = tf.labels_from_tforms(as_t(tforms)[None], pairs, label_type, calib, points_mm)

    # expected labels from the float64 formulas
    if label_type == "point":
        expected = np.stack([(t @ points_mm.numpy())[:3] for t in truth])
    elif label_type == "transform":
        expected = truth
    else:
        expected = np.stack([tf.matrix_to_params(as_t(t)).numpy() for t in truth])
        for k, t in enumerate(truth):  # check the angles independently: they must rebuild t
            assert np.allclose(ref.rigid(*expected[k][:3], expected[k][3:]), t, atol=1e-9)
    assert_close(labels[0], as_t(expected), atol=1e-8, rtol=0)

    if pred_type == "point":
        outputs = np.stack([(t @ points_mm.numpy())[:3] for t in truth]).reshape(1, -1)
    elif pred_type == "transform":
        outputs = truth[:, :3, :].reshape(1, -1)
    elif pred_type == "parameter":
        outputs = np.stack([tf.matrix_to_params(as_t(t)).numpy() for t in truth]).reshape(1, -1)
    else:
        outputs = np.stack([tf.matrix_to_quaternion(as_t(t)).numpy() for t in truth])
        outputs[:, :4] *= 3.0  # an unnormalised network output must be normalised before use
        outputs = outputs.reshape(1, -1)
    got = tf.prediction_to_label(as_t(outputs), pred_type, label_type, len(pairs), points_mm)
    assert_close(got, labels, atol=1e-8, rtol=0)


def test_prediction_to_label_refuses_unsupported_combination():
    with pytest.raises(ValueError, match="cannot produce"):
        tf.prediction_to_label(torch.zeros(1, 12), "transform", "parameter", 1, torch.zeros(4, 4))


def test_transforms_run_in_float32_and_keep_dtype():
    params = torch.tensor([[0.1, -0.2, 0.3, 1.0, 2.0, 3.0]], dtype=torch.float32)
    matrix = tf.params_to_matrix(params)
    assert matrix.dtype == torch.float32
    assert tf.matrix_to_params(matrix).dtype == torch.float32
    assert tf.matrix_to_quaternion(matrix).dtype == torch.float32


def test_pair_samples_as_the_baseline_defines_them():
    # Written out from the baseline's definition: each of the last NUM_PRED frames with every
    # earlier frame of the window, ordered by the moving frame.
    assert tf.pair_samples(2, 1).tolist() == [[0, 1]]
    assert tf.pair_samples(4, 1).tolist() == [[0, 3], [1, 3], [2, 3]]
    assert tf.pair_samples(4, 3).tolist() == [[0, 1], [0, 2], [1, 2], [0, 3], [1, 3], [2, 3]]
    with pytest.raises(ValueError, match="NUM_PRED=2"):
        tf.pair_samples(2, 2)
    with pytest.raises(ValueError, match="NUM_SAMPLES=1"):
        tf.pair_samples(1, 1)


@settings(max_examples=50, deadline=None)
@given(params_strategy)
def test_points_to_matrix_recovers_a_rigid_transform_from_moved_corners(params):
    matrix = as_t(ref.rigid(params[0], params[1], params[2], params[3:]))
    corners_mm = as_t(ref.REAL_SCALE) @ tf.image_corners((480, 640)).double()
    moved = (matrix @ corners_mm)[:3]
    assert_close(tf.points_to_matrix(moved, corners_mm), matrix, atol=1e-8, rtol=0)


def test_points_to_matrix_is_a_proper_rotation_for_noisy_points():
    generator = torch.Generator().manual_seed(0)
    corners_mm = as_t(ref.REAL_SCALE) @ tf.image_corners((480, 640)).double()
    noisy = corners_mm[:3] + torch.randn(16, 3, 4, generator=generator, dtype=torch.float64)
    fitted = tf.points_to_matrix(noisy, corners_mm)
    rotation = fitted[:, :3, :3]
    assert_close(rotation.transpose(-1, -2) @ rotation, torch.eye(3, dtype=torch.float64).expand(16, 3, 3))
    assert_close(torch.linalg.det(rotation), torch.ones(16, dtype=torch.float64))


@pytest.mark.parametrize("pred_type,label_type", [(p, l) for p, ls in tf.ALLOWED_PRED_LABEL.items() for l in ls])
def test_identity_prediction_means_no_motion(pred_type, label_type):
    corners_mm = as_t(ref.REAL_SCALE) @ tf.image_corners((480, 640)).double()
    outputs = tf.identity_prediction(pred_type, 3, corners_mm)[None]
    label = tf.prediction_to_label(outputs.double(), pred_type, label_type, 3, corners_mm)
    expected = tf.matrix_to_label(torch.eye(4, dtype=torch.float64).expand(1, 3, 4, 4), label_type, corners_mm)
    assert_close(label, expected, atol=1e-5, rtol=0)
