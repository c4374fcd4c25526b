"""Rigid-transform geometry of tracked freehand ultrasound: the one module that knows the conventions.

Conventions (DESIGN.md section 2; identical to the TUS-REC baseline so its weights mean the same here)
------------------------------------------------------------------------------------------------------
Left multiplication of column vectors, homogeneous 4x4 matrices named ``tform_<src>_to_<dst>``.

- Image pixel ``p = [x, y, 0, 1]``: x = column (1..W), y = row (1..H). Pixels count from 1, as in
  the challenge calibration.
- ``S`` = ``tform_calib_scale``: image pixel -> image mm (diagonal).
- ``C`` = ``tform_calib_R_T``: image mm -> tracker tool (rigid).
- ``tforms[i]``: tracker tool -> camera (world) for frame i, as recorded by the optical tracker.
- Frame i to frame j, both in image mm: ``T_{j<-i} = C^-1 . tforms[j]^-1 . tforms[i] . C``.
  The baseline calls the pair ``(j, i) = (reference, moving)``: ``pairs[:, 0]`` is the frame the
  transform maps *into*, ``pairs[:, 1]`` the frame it maps *from*.
- Global transform of frame i: ``T_{0<-i}``; local: ``T_{i-1<-i}``;
  ``T_{0<-i} = T_{0<-1} . T_{1<-2} ... T_{i-1<-i}``.
- Flattened pixel order (``reference_image_points([H, W], [H, W])``): row-major over (y, x),
  point k has ``x = k % W + 1``, ``y = k // W + 1``.

Network outputs and labels per pair of frames
---------------------------------------------
- ``parameter``: 6 values ``[a_Z, a_Y, a_X, t_x, t_y, t_z]``; ``R = Rz(a_Z) Ry(a_Y) Rx(a_X)``
  (intrinsic ZYX, radians, pytorch3d's ``euler_angles_to_matrix(.., "ZYX")``), translation in mm.
- ``transform``: 12 values, the top three rows of the 4x4, row-major.
- ``quaternion``: 7 values, quaternion with the real part first ``(w, x, y, z)``, normalised before
  use, then the translation in mm.
- ``point``: ``3 x P`` coordinates in mm of the reference points (the four image corners by default)
  after the transform, in the reference frame's image mm.

Every function is pure, batched over leading dimensions and keeps the dtype and device of its
input. roma does the rotation conversions (pytorch3d is not installable with current torch); roma
orders quaternions ``(x, y, z, w)``, so this module reorders them at its boundary.
"""

from __future__ import annotations

import roma
import torch

LABEL_TYPES = ("point", "parameter", "transform")
PRED_TYPES = ("parameter", "transform", "quaternion", "point")

# Prediction -> label combinations the baseline supports. A free 3x4 `transform` prediction is not
# orthonormal, so it has no Euler angles; `point` predictions carry no rigid transform at all.
ALLOWED_PRED_LABEL = {
    "parameter": ("point", "parameter", "transform"),
    "transform": ("point", "transform"),
    "quaternion": ("point", "parameter", "transform"),
    "point": ("point",),
}

_VALUES_PER_TYPE = {"parameter": 6, "transform": 12, "quaternion": 7}

# The six degrees of freedom of a ``parameter`` vector, in its order, with the unit each is reported
# in. The image plane is z = 0, so a rotation about z and translations along x and y keep a frame in
# its plane ("in-plane"); the other three move it out of its plane (elevational motion, which the
# images show through speckle decorrelation, without its direction).
DOF_NAMES = ("rz", "ry", "rx", "tx", "ty", "tz")
DOF_UNITS = ("deg", "deg", "deg", "mm", "mm", "mm")
IN_PLANE_DOFS = (0, 3, 4)
OUT_OF_PLANE_DOFS = (1, 2, 5)


def check_pred_label(pred_type: str, label_type: str) -> None:
    """Raise ValueError unless ``pred_type`` can be compared with a ``label_type`` label."""
    if pred_type not in ALLOWED_PRED_LABEL:
        raise ValueError(f"PRED_TYPE={pred_type!r} is not one of {list(PRED_TYPES)}")
    if label_type not in LABEL_TYPES:
        raise ValueError(f"LABEL_TYPE={label_type!r} is not one of {list(LABEL_TYPES)}")
    allowed = ALLOWED_PRED_LABEL[pred_type]
    if label_type not in allowed:
        combos = "; ".join(f"{p} -> {', '.join(ls)}" for p, ls in ALLOWED_PRED_LABEL.items())
        raise ValueError(
            f"PRED_TYPE={pred_type!r} cannot produce LABEL_TYPE={label_type!r}; "
            f"allowed for {pred_type!r}: {list(allowed)} (all combinations: {combos})"
        )


def type_dim(kind: str, num_points: int, num_pairs: int) -> int:
    """Number of network outputs (or label values) for ``num_pairs`` pairs of type ``kind``.

    ``num_points`` is the number of reference points P of the ``point`` type (4 image corners).
    """
    if kind == "point":
        return 3 * num_points * num_pairs
    if kind not in _VALUES_PER_TYPE:
        raise ValueError(f"unknown type {kind!r}; expected one of {list(PRED_TYPES)}")
    return _VALUES_PER_TYPE[kind] * num_pairs


# --------------------------------------------------------------------------------------------
# Pixel grid
# --------------------------------------------------------------------------------------------


def reference_image_points(image_size, density=2) -> torch.Tensor:
    """Homogeneous pixel coordinates of a regular grid over an image, in the official order.

    Args:
        image_size: ``(H, W)``, the number of rows and columns (the baseline's docstring calls
            this (x, y) but every call passes ``[h, w]``).
        density: points per axis ``(n_y, n_x)`` or one int for both; ``(H, W)`` gives every pixel,
            2 gives the four corners.
    Returns:
        float32 tensor [4, n_y * n_x]: rows x (column, 1..W), y (row, 1..H), 0, 1. Row-major over
        (y, x): point k has x index ``k % n_x`` and y index ``k // n_x``.
    """
    if isinstance(density, int):
        density = (density, density)
    height, width = int(image_size[0]), int(image_size[1])
    n_y, n_x = int(density[0]), int(density[1])
    if min(height, width, n_y, n_x) < 1:
        raise ValueError(f"image_size {image_size} and density {density} must be positive")
    ys = torch.linspace(1, height, n_y, dtype=torch.float32)
    xs = torch.linspace(1, width, n_x, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    num = n_y * n_x
    return torch.stack(
        [grid_x.reshape(num), grid_y.reshape(num), torch.zeros(num), torch.ones(num)]
    )


def image_corners(image_size) -> torch.Tensor:
    """The four image corners [4, 4] (homogeneous, pixels), in the order of the ``point`` type."""
    return reference_image_points(image_size, 2)


# --------------------------------------------------------------------------------------------
# Rigid transforms
# --------------------------------------------------------------------------------------------


def homogeneous(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Assemble [..., 4, 4] from rotation [..., 3, 3] and translation [..., 3]."""
    top = torch.cat([rotation, translation[..., None]], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1
    return torch.cat([top, bottom], dim=-2)


def invert_rigid(tform: torch.Tensor) -> torch.Tensor:
    """Inverse [..., 4, 4] of rigid transforms: ``[R^T, -R^T t]``, exact where R is orthonormal."""
    rotation_t = tform[..., :3, :3].transpose(-1, -2)
    return homogeneous(rotation_t, -(rotation_t @ tform[..., :3, 3:4])[..., 0])


def relative_transforms(tforms: torch.Tensor, pairs, tform_calib_R_T: torch.Tensor) -> torch.Tensor:
    """Image-mm transforms between frames of a scan: ``T_{j<-i} = C^-1 tforms[j]^-1 tforms[i] C``.

    Args:
        tforms: [..., N, 4, 4] tracker tool -> camera, one per frame.
        pairs: [M, 2] integer frame indices ``(j, i)`` = (reference, moving).
        tform_calib_R_T: [4, 4] ``C``, image mm -> tool.
    Returns:
        [..., M, 4, 4] transforms from frame i's image mm to frame j's image mm, in the dtype of
        ``tforms``. Tracker poses are inverted with a general inverse, as the baseline does, so
        slightly non-orthonormal recorded rotations give the baseline's numbers.
    """
    pairs = torch.as_tensor(pairs, dtype=torch.long, device=tforms.device)
    calib = tform_calib_R_T.to(tforms)
    tool_moving_to_world = tforms[..., pairs[:, 1], :, :]
    world_to_tool_reference = torch.linalg.inv(tforms[..., pairs[:, 0], :, :])
    tool_moving_to_tool_reference = world_to_tool_reference @ tool_moving_to_world
    return torch.linalg.inv(calib) @ tool_moving_to_tool_reference @ calib


def pair_samples(num_samples: int, num_pred: int) -> torch.Tensor:
    """The baseline's training pairs within a window of ``num_samples`` frames: [M, 2] ``(j, i)``.

    Each of the last ``num_pred`` frames i of the window is paired with every earlier frame j < i,
    ordered by i then j (``NUM_SAMPLES=2, NUM_PRED=1`` gives ``[[0, 1]]``). The network predicts
    ``T_{j<-i}`` for every row, in this order.
    """
    num_samples, num_pred = int(num_samples), int(num_pred)
    if num_samples < 2:
        raise ValueError(f"NUM_SAMPLES={num_samples} must be at least 2 (a pair of frames)")
    if not 1 <= num_pred <= num_samples - 1:
        raise ValueError(f"NUM_PRED={num_pred} must be in 1..NUM_SAMPLES-1 = 1..{num_samples - 1}")
    pairs = [(j, i) for i in range(num_samples - num_pred, num_samples) for j in range(i)]
    return torch.tensor(pairs, dtype=torch.long)


# How a window's predicted pairs are laid out: the baseline's (``pair_samples``), or every
# consecutive pair (a sequence model predicts each frame's local transform in one pass).
WINDOW_PAIRS = ("baseline", "consecutive")


def consecutive_pairs(num_samples: int) -> torch.Tensor:
    """Every local pair of a window of ``num_samples`` frames: [num_samples - 1, 2] rows ``(i, i+1)``.

    The network predicts ``T_{i<-i+1}`` for row i, so a window gives the local transform of each of
    its frames after the first.
    """
    num_samples = int(num_samples)
    if num_samples < 2:
        raise ValueError(f"NUM_SAMPLES={num_samples} must be at least 2 (a pair of frames)")
    index = torch.arange(num_samples - 1)
    return torch.stack([index, index + 1], dim=1)


def window_pairs(kind: str, num_samples: int, num_pred: int) -> torch.Tensor:
    """The pairs ``(j, i)`` a network predicts per window: ``pair_samples(num_samples, num_pred)`` for
    ``kind="baseline"``, ``consecutive_pairs(num_samples)`` for ``"consecutive"`` (which needs
    ``num_pred = num_samples - 1``: one transform per frame after the first)."""
    if kind == "baseline":
        return pair_samples(num_samples, num_pred)
    if kind != "consecutive":
        raise ValueError(f"window_pairs={kind!r} is not one of {list(WINDOW_PAIRS)}")
    if int(num_pred) != int(num_samples) - 1:
        raise ValueError(f"window_pairs='consecutive' predicts every frame after the first: NUM_PRED must be "
                         f"NUM_SAMPLES-1 = {int(num_samples) - 1}, got {num_pred}")
    return consecutive_pairs(num_samples)


def data_pairs_global(num_frames: int) -> torch.Tensor:
    """Pairs ``(0, i)`` for i = 0..num_frames-1 (the baseline's helper; row 0 is the identity)."""
    index = torch.arange(num_frames)
    return torch.stack([torch.zeros_like(index), index], dim=1)


def data_pairs_local(num_frames: int) -> torch.Tensor:
    """Pairs ``(i, i+1)`` for i = 0..num_frames-1 (the baseline's helper)."""
    index = torch.arange(num_frames)
    return torch.stack([index, index + 1], dim=1)


def global_transforms(tforms: torch.Tensor, tform_calib_R_T: torch.Tensor) -> torch.Tensor:
    """``T_{0<-i}`` for i = 1..N-1: [..., N-1, 4, 4] from tforms [..., N, 4, 4]."""
    return relative_transforms(tforms, data_pairs_global(tforms.shape[-3])[1:], tform_calib_R_T)


def local_transforms(tforms: torch.Tensor, tform_calib_R_T: torch.Tensor) -> torch.Tensor:
    """``T_{i-1<-i}`` for i = 1..N-1: [..., N-1, 4, 4] from tforms [..., N, 4, 4]."""
    return relative_transforms(tforms, data_pairs_local(tforms.shape[-3] - 1), tform_calib_R_T)


def chain_local_transforms(local: torch.Tensor) -> torch.Tensor:
    """Global transforms from local ones: ``G_i = L_1 L_2 ... L_i``.

    Args:
        local: [..., M, 4, 4] with ``local[k] = T_{k<-k+1}``.
    Returns:
        [..., M, 4, 4] with ``out[k] = T_{0<-k+1}``.

    An inclusive prefix scan (Hillis-Steele): log2(M) batched matmuls instead of M sequential ones,
    which keeps a 1500-frame scan at 11 kernel launches on a GPU. The product order is preserved
    (matrix products are associative, not commutative).
    """
    out = local.clone()
    count = out.shape[-3]
    step = 1
    while step < count:
        # out[k] <- out[k - step] @ out[k] for k >= step, all from the previous level's values.
        out = torch.cat([out[..., :step, :, :], out[..., :-step, :, :] @ out[..., step:, :, :]], dim=-3)
        step *= 2
    return out


# --------------------------------------------------------------------------------------------
# Parameterisations
# --------------------------------------------------------------------------------------------


def params_to_matrix(params: torch.Tensor) -> torch.Tensor:
    """[..., 6] ``[a_Z, a_Y, a_X, t_x, t_y, t_z]`` (radians, mm) -> [..., 4, 4]."""
    # roma: upper-case axes are intrinsic, so "ZYX" gives Rz(a0) Ry(a1) Rx(a2) as pytorch3d does.
    rotation = roma.euler_to_rotmat("ZYX", params[..., 0:3])
    return homogeneous(rotation.to(params.dtype), params[..., 3:6])


def matrix_to_params(tform: torch.Tensor) -> torch.Tensor:
    """[..., 4, 4] rigid -> [..., 6]; ``a_Y`` in [-pi/2, pi/2], ``a_Z``, ``a_X`` in (-pi, pi]."""
    angles = roma.rotmat_to_euler("ZYX", tform[..., 0:3, 0:3])
    return torch.cat([angles.to(tform.dtype), tform[..., 0:3, 3]], dim=-1)


def quaternion_to_matrix(quaternion: torch.Tensor) -> torch.Tensor:
    """[..., 7] ``(w, x, y, z, t_x, t_y, t_z)`` -> [..., 4, 4]; the quaternion need not be unit."""
    wxyz = quaternion[..., 0:4]
    unit = wxyz / torch.linalg.vector_norm(wxyz, dim=-1, keepdim=True)
    rotation = roma.unitquat_to_rotmat(unit[..., [1, 2, 3, 0]])
    return homogeneous(rotation, quaternion[..., 4:7])


def matrix_to_quaternion(tform: torch.Tensor) -> torch.Tensor:
    """[..., 4, 4] rigid -> [..., 7] ``(w, x, y, z, t)`` with a unit quaternion and ``w >= 0``."""
    xyzw = roma.rotmat_to_unitquat(tform[..., 0:3, 0:3])
    wxyz = xyzw[..., [3, 0, 1, 2]]
    wxyz = torch.where(wxyz[..., :1] < 0, -wxyz, wxyz)
    return torch.cat([wxyz, tform[..., 0:3, 3]], dim=-1)


def transform12_to_matrix(values: torch.Tensor) -> torch.Tensor:
    """[..., 12] top three rows (row-major) -> [..., 4, 4]; no orthonormality is imposed."""
    top = values.reshape(*values.shape[:-1], 3, 4)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1
    return torch.cat([top, bottom], dim=-2)


def matrix_to_transform12(tform: torch.Tensor) -> torch.Tensor:
    """[..., 4, 4] -> [..., 12], the top three rows row-major."""
    return tform[..., 0:3, :].reshape(*tform.shape[:-2], 12)


def transform_points(tform: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply [..., 4, 4] to homogeneous points [4, P]: returns [..., 3, P] (mm when both are)."""
    return (tform @ points.to(tform))[..., 0:3, :]


def points_to_matrix(points: torch.Tensor, reference_points: torch.Tensor) -> torch.Tensor:
    """The rigid transform that best moves ``reference_points`` onto ``points`` (least squares).

    Args:
        points: [..., 3, P] target positions (e.g. a ``point`` prediction), mm.
        reference_points: [4, P] or [3, P] the points before the transform (e.g. image corners in
            image mm); P >= 3 and not collinear.
    Returns:
        [..., 4, 4] proper rotation (det +1) and translation minimising the summed squared distances
        (Kabsch: SVD of the cross-covariance, with the reflection case folded back), in the dtype of
        ``points``. Used to turn ``point`` predictions into transforms for chaining and DDFs.
    """
    source = reference_points[:3].to(points)
    source_mean = source.mean(dim=-1, keepdim=True)
    target_mean = points.mean(dim=-1, keepdim=True)
    covariance = (points - target_mean) @ (source - source_mean).transpose(-1, -2)  # [..., 3, 3]
    u, _, vh = torch.linalg.svd(covariance)
    # Flip the axis of the smallest singular value when U V^T would be a reflection; for coplanar
    # points (image corners) that singular value is 0 and the flip picks the proper rotation.
    sign = torch.sign(torch.linalg.det(u @ vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    correction = torch.ones(*sign.shape, 3, dtype=points.dtype, device=points.device)
    correction[..., 2] = sign
    rotation = u @ torch.diag_embed(correction) @ vh
    translation = (target_mean - rotation @ source_mean)[..., 0]
    return homogeneous(rotation, translation)


# --------------------------------------------------------------------------------------------
# Labels and predictions (the baseline's LabelTransform / PredictionTransform as functions)
# --------------------------------------------------------------------------------------------


def matrix_to_label(tform: torch.Tensor, label_type: str, image_points_mm: torch.Tensor) -> torch.Tensor:
    """Express image-mm transforms [..., 4, 4] as labels of ``label_type``.

    Returns ``point`` [..., 3, P] (``image_points_mm`` [4, P] moved by the transform),
    ``parameter`` [..., 6] or ``transform`` [..., 4, 4] (the baseline compares full matrices).
    """
    if label_type == "point":
        return transform_points(tform, image_points_mm)
    if label_type == "parameter":
        return matrix_to_params(tform)
    if label_type == "transform":
        return tform
    raise ValueError(f"LABEL_TYPE={label_type!r} is not one of {list(LABEL_TYPES)}")


def label_to_matrix(values: torch.Tensor, label_type: str, image_points_mm: torch.Tensor) -> torch.Tensor:
    """Labels (or predictions in the label type) [..., ...] -> image-mm transforms [..., 4, 4].

    The inverse of ``matrix_to_label``: ``parameter`` through ``params_to_matrix``, ``transform`` as
    is, ``point`` [..., 3, P] through the least-squares rigid fit to ``image_points_mm`` [4, P].
    """
    if label_type == "point":
        return points_to_matrix(values, image_points_mm)
    if label_type == "parameter":
        return params_to_matrix(values)
    if label_type == "transform":
        return values
    raise ValueError(f"LABEL_TYPE={label_type!r} is not one of {list(LABEL_TYPES)}")


def dof_values(tform: torch.Tensor) -> torch.Tensor:
    """[..., 4, 4] rigid -> [..., 6] ``DOF_NAMES`` values in ``DOF_UNITS`` (degrees and mm).

    ``matrix_to_params`` with the angles in degrees: the units a person reads per-DOF errors in.
    """
    params = matrix_to_params(tform)
    return torch.cat([torch.rad2deg(params[..., 0:3]), params[..., 3:6]], dim=-1)


def labels_from_tforms(
    tforms: torch.Tensor,
    pairs,
    label_type: str,
    tform_calib_R_T: torch.Tensor,
    image_points_mm: torch.Tensor,
) -> torch.Tensor:
    """Training labels of ``pairs`` from tracker poses [..., N, 4, 4] (see ``matrix_to_label``)."""
    return matrix_to_label(relative_transforms(tforms, pairs, tform_calib_R_T), label_type, image_points_mm)


def prediction_to_matrix(prediction: torch.Tensor, pred_type: str) -> torch.Tensor:
    """Per-pair network output [..., D] of ``pred_type`` -> image-mm transform [..., 4, 4]."""
    if pred_type == "parameter":
        return params_to_matrix(prediction)
    if pred_type == "transform":
        return transform12_to_matrix(prediction)
    if pred_type == "quaternion":
        return quaternion_to_matrix(prediction)
    if pred_type == "point":
        raise ValueError("PRED_TYPE='point' predicts point positions, not a transform")
    raise ValueError(f"PRED_TYPE={pred_type!r} is not one of {list(PRED_TYPES)}")


def identity_prediction(pred_type: str, num_pairs: int, image_points_mm: torch.Tensor | None = None) -> torch.Tensor:
    """Network outputs [num_pairs * D] that mean "no motion" for every pair, float32.

    ``parameter`` zeros; ``transform`` the top rows of the identity; ``quaternion`` ``(1, 0, 0, 0)``
    and zero translation; ``point`` the reference points themselves (``image_points_mm`` [4, P],
    required for that type). A network whose last layer starts at zero weights and this bias starts
    from the identity, the prediction that scores 0 (see ``train.py``'s ``identity_init``).
    """
    if pred_type == "parameter":
        one = torch.zeros(6)
    elif pred_type == "transform":
        one = torch.eye(4)[:3].reshape(12)
    elif pred_type == "quaternion":
        one = torch.tensor([1.0, 0, 0, 0, 0, 0, 0])
    elif pred_type == "point":
        if image_points_mm is None:
            raise ValueError("PRED_TYPE='point' needs image_points_mm for its identity prediction")
        one = image_points_mm[:3].float().reshape(-1).cpu()
    else:
        raise ValueError(f"PRED_TYPE={pred_type!r} is not one of {list(PRED_TYPES)}")
    return one.float().repeat(int(num_pairs))


def prediction_to_label(
    outputs: torch.Tensor,
    pred_type: str,
    label_type: str,
    num_pairs: int,
    image_points_mm: torch.Tensor,
) -> torch.Tensor:
    """Network outputs [B, num_pairs * D] -> labels [B, num_pairs, ...] comparable with the labels.

    ``image_points_mm`` [4, P] are the reference points in image mm (``S @ points``).
    """
    check_pred_label(pred_type, label_type)
    per_pair = outputs.reshape(outputs.shape[0], num_pairs, -1)
    if pred_type == "point":
        return per_pair.reshape(outputs.shape[0], num_pairs, 3, -1)
    if pred_type == "parameter" and label_type == "parameter":
        return per_pair  # no round trip through a matrix: it would wrap angles
    return matrix_to_label(prediction_to_matrix(per_pair, pred_type), label_type, image_points_mm)
