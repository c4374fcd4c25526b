"""Independent float64 formulas the tests compare against (never calls the code under test).

Written from DESIGN.md sections 2 and 4 with numpy and explicit trigonometry: rotation matrices
from their textbook definitions, every pixel's displacement from ``T S p - S p`` on a materialised
grid, landmark look-up by 1-based (x, y), and the official ``cal_dist``.
"""

import numpy as np

# The public TUS-REC calibration (DESIGN.md section 3).
REAL_SCALE = np.diag([0.229389190673828, 0.220979690551758, 1.0, 1.0])
REAL_CALIB_R_T = np.array(
    [
        [0.231064671309448, -0.218052035, 0.948189025293473, -70.74132919],
        [-0.190847036, -0.965787273, -0.175591436, -80.6505661],
        [0.954036962825936, -0.140386088, -0.264773903, -46.17662239],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def rot_x(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_z(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def rigid(a_z, a_y, a_x, t):
    """4x4 with R = Rz(a_z) Ry(a_y) Rx(a_x) (intrinsic ZYX) and translation t."""
    out = np.eye(4)
    out[:3, :3] = rot_z(a_z) @ rot_y(a_y) @ rot_x(a_x)
    out[:3, 3] = t
    return out


def quat_wxyz_to_rot(q):
    """Rotation of a (not necessarily unit) quaternion, real part first (Hamilton convention)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def random_tforms(rng, num_frames, step_mm=0.8, step_rad=0.02):
    """A random-walk probe trajectory: [N, 4, 4] float64 rigid tool->camera poses."""
    out = np.empty((num_frames, 4, 4))
    pose = rigid(*rng.uniform(-np.pi, np.pi, 3), rng.uniform(-200, 200, 3))
    for i in range(num_frames):
        out[i] = pose
        pose = pose @ rigid(*rng.normal(0, step_rad, 3), rng.normal(0, step_mm, 3))
    return out


def frame_to_frame(tforms, calib_r_t, j, i):
    """T_{j<-i} = C^-1 tforms[j]^-1 tforms[i] C in float64."""
    return np.linalg.inv(calib_r_t) @ np.linalg.inv(tforms[j]) @ tforms[i] @ calib_r_t


def pixel_grid(height, width):
    """[4, H*W] homogeneous pixels, row-major over (y, x), 1-based (DESIGN.md section 2)."""
    y, x = np.meshgrid(np.arange(1, height + 1), np.arange(1, width + 1), indexing="ij")
    return np.stack([x.ravel(), y.ravel(), np.zeros(x.size), np.ones(x.size)]).astype(np.float64)


def ddf(transform, scale, height, width):
    """[3, H*W] displacement (T S p - S p)[0:3] of every pixel, mm."""
    points_mm = scale @ pixel_grid(height, width)
    return (transform @ points_mm - points_mm)[:3]


def ddf_points(transform, scale, points):
    """[3, P] displacement (T S p - S p)[0:3] of arbitrary homogeneous pixels points [4, P], mm."""
    points_mm = scale @ np.asarray(points, dtype=np.float64)
    return (transform @ points_mm - points_mm)[:3]


def scan_ddfs(tforms, calib_r_t, scale, height, width):
    """GP, LP [N-1, 3, H*W] of a scan from tracker poses, float64."""
    n = len(tforms)
    gp = np.stack([ddf(frame_to_frame(tforms, calib_r_t, 0, i), scale, height, width) for i in range(1, n)])
    lp = np.stack([ddf(frame_to_frame(tforms, calib_r_t, i - 1, i), scale, height, width) for i in range(1, n)])
    return gp, lp


def landmark_ddfs(fields, landmarks, width):
    """[3, K] fields of landmarks (frame from 0, x from 1, y from 1): row f-1, pixel (y-1)W + x-1."""
    return np.stack([fields[f - 1, :, (y - 1) * width + (x - 1)] for f, x, y in landmarks], axis=1)


def cal_dist(label, pred, mode="all"):
    """The official TUS-REC metric, verbatim in behaviour."""
    if mode == "all":
        return np.sqrt(((label - pred) ** 2).sum(axis=1)).mean()
    if mode == "landmark":
        return np.sqrt(((label - pred) ** 2).sum(axis=0)).mean()
    raise ValueError(mode)


def scan_transforms(tforms, calib_r_t):
    """Global T_{0<-i} and local T_{i-1<-i} [N-1, 4, 4] of a scan, i = 1..N-1, float64."""
    n = len(tforms)
    glob = np.stack([frame_to_frame(tforms, calib_r_t, 0, i) for i in range(1, n)])
    loc = np.stack([frame_to_frame(tforms, calib_r_t, i - 1, i) for i in range(1, n)])
    return glob, loc


def perturbed_tforms(rng, tforms, step_mm=0.5, step_rad=0.01):
    """A drifting 'prediction' of a trajectory: each pose times an accumulated random rigid error."""
    out = np.empty_like(tforms)
    error = np.eye(4)
    for i in range(len(tforms)):
        out[i] = tforms[i] @ error
        error = error @ rigid(*rng.normal(0, step_rad, 3), rng.normal(0, step_mm, 3))
    return out
