"""Volume reconstruction (utils/reconstruction.py, reconstruct.py): geometry, compounding, hole filling, export.

Scans of known shapes are built here from an independent formula (a pixel (x, y) of frame i sits at
``R_i [x s_x, y s_y, 0] + t_i``, rotations from explicit angle formulas), so a wrong convention in the
module cannot cancel out in the test.
"""

import csv
import math
import sys

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from utils import reconstruction as rec
from utils.errors import InputError

SX, SY = 0.25, 0.25  # mm per pixel of the synthetic scans
SCALE = np.diag([SX, SY, 1.0, 1.0])


def rot_x(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def sweep_poses(num, step_mm=0.2, tilt_deg=6.0):
    """[N, 4, 4] image mm -> reference mm: an elevational sweep with a tilt and a sideways wobble."""
    poses = np.zeros((num, 4, 4))
    for i in range(num):
        u = i / max(1, num - 1)
        poses[i, :3, :3] = rot_x(math.radians(tilt_deg) * math.sin(2 * math.pi * u)) @ rot_y(math.radians(3) * u)
        poses[i, :3, 3] = [0.7 * math.sin(3 * u), -0.4 * u, step_mm * i]
        poses[i, 3, 3] = 1
    return poses


def render(poses, height, width, inside):
    """uint8 frames [N, H, W]: 200 where ``inside(points [M, 3])`` holds, 40 elsewhere."""
    ys, xs = np.mgrid[1:height + 1, 1:width + 1]
    image_mm = np.stack([xs.ravel() * SX, ys.ravel() * SY, np.zeros(xs.size)], axis=1)
    frames = np.empty((len(poses), height, width), np.uint8)
    for i, pose in enumerate(poses):
        points = image_mm @ pose[:3, :3].T + pose[:3, 3]
        frames[i] = np.where(inside(points), 200, 40).reshape(height, width)
    return frames


def bright_voxel_points(volume, level=120.0, sampled_only=False):
    covered = volume.coverage == rec.COVERAGE_SAMPLED if sampled_only else volume.covered()
    index = np.argwhere(covered & (volume.values > level))[:, ::-1]  # (i, j, k)
    return volume.grid.voxel_points(index)


# --------------------------------------------------------------------------------------------
# Known shapes at the right place
# --------------------------------------------------------------------------------------------


def test_bright_sphere_reconstructs_at_its_centre_within_a_voxel():
    centre, radius = np.array([10.3, 8.1, 6.2]), 4.0
    poses = sweep_poses(64)
    frames = render(poses, 80, 88, lambda p: np.linalg.norm(p - centre, axis=1) <= radius)
    spacing = 0.5
    volume = rec.reconstruct(frames, poses, SCALE, spacing=spacing, fill_radius=2)
    bright = bright_voxel_points(volume)
    assert np.linalg.norm(bright.mean(axis=0) - centre) < spacing  # one voxel
    # the bright voxels are a ball of the right size: volume within 15 %, extent within one voxel
    assert abs(len(bright) * spacing**3 / (4 / 3 * math.pi * radius**3) - 1) < 0.15
    assert np.abs(np.linalg.norm(bright - centre, axis=1).max() - radius) < spacing


def test_bright_plane_reconstructs_at_its_place_within_a_voxel():
    normal = np.array([0.2, -0.6, 0.77])
    normal /= np.linalg.norm(normal)
    anchor = np.array([11.0, 9.0, 6.0])
    poses = sweep_poses(64)
    frames = render(poses, 80, 88, lambda p: np.abs((p - anchor) @ normal) <= 0.75)
    volume = rec.reconstruct(frames, poses, SCALE, spacing=0.5, fit="obb")
    bright = bright_voxel_points(volume)
    centred = bright - bright.mean(axis=0)
    fitted_normal = np.linalg.svd(centred, full_matrices=False)[2][2]
    assert math.degrees(math.acos(min(1.0, abs(fitted_normal @ normal)))) < 3.0
    # a pixel goes to the voxel whose centre is within half a voxel diagonal of it: every bright
    # sampled voxel lies within the slab's half-thickness plus that of the true plane
    sampled = bright_voxel_points(volume, sampled_only=True)
    assert np.abs((sampled - anchor) @ normal).max() <= 0.75 + math.sqrt(3) / 2 * 0.5
    assert abs((bright.mean(axis=0) - anchor) @ normal) < 0.5


def test_identity_pose_puts_every_pixel_in_its_own_voxel_and_averages_repeats():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 12, 15), dtype=np.uint8)
    poses = np.stack([np.eye(4), np.eye(4)])
    scale = np.diag([0.5, 0.5, 1, 1])
    # spacing = pixel size: voxel centres are the pixel centres (no rounding ties)
    volume = rec.reconstruct(frames, poses, scale, spacing=0.5, fill_radius=0)
    assert volume.grid.size == (15, 12, 1)
    np.testing.assert_allclose(volume.grid.origin, [0.5, 0.5, 0.0])
    np.testing.assert_array_equal(volume.values[0], frames.astype(np.float32).mean(axis=0))
    assert (volume.coverage == rec.COVERAGE_SAMPLED).all()


def test_known_translations_shift_the_frame_by_whole_voxels_and_fill_between():
    frames = np.zeros((3, 4, 6), np.uint8)
    frames[0], frames[1], frames[2] = 10, 100, 250
    frames[0, 0, 0] = 30
    poses = np.stack([np.eye(4)] * 3)
    poses[1, 0, 3] = 1.0  # frame 1: 1 mm = 2 voxels along X, same plane as frame 0
    poses[2, 2, 3] = 1.5  # frame 2: 1.5 mm = 3 voxels along Z
    scale = np.diag([0.5, 0.5, 1, 1])
    sums, counts = rec.compound(frames, poses, scale,
                                rec.VolumeGrid([0.5, 0.5, 0.0], [0.5] * 3, (8, 4, 4), np.eye(3)))
    values = (sums / counts.clamp_min(1)).numpy()
    counts = counts.numpy()
    # plane k = 0: frame 0 in columns 0-5, frame 1 in columns 2-7, averaged where both fall
    np.testing.assert_array_equal(counts[0, :, 0:2], 1)
    np.testing.assert_array_equal(counts[0, :, 2:6], 2)
    np.testing.assert_array_equal(values[0, 1:, 2:6], 55.0)
    assert values[0, 0, 0] == 30.0 and values[0, 0, 6] == 100.0
    # plane k = 3: frame 2; planes 1 and 2: empty until hole filling
    np.testing.assert_array_equal(values[3, :, 0:6], 250.0)
    assert counts[1:3].sum() == 0
    filled, was_filled = rec.fill_holes(values, counts > 0, radius=2.0)
    assert was_filled[1:3, :, 0:6].all()
    # plane 1 is nearer plane 0 (mean 55 in columns 2-5) than plane 3: its value leans that way
    assert 55.0 < filled[1, 2, 3] < filled[2, 2, 3] < 250.0


def test_numba_and_torch_backends_give_the_same_volume():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (7, 30, 40), dtype=np.uint8)
    poses = sweep_poses(7, step_mm=0.37, tilt_deg=20)
    mask = np.zeros((30, 40), bool)
    mask[3:27, 5:37] = True
    mask[3:10, 5:12] = False
    grid = rec.fit_grid(poses, rec.mask_outline_mm(mask, SCALE), spacing=0.3)
    numba_sums, numba_counts = rec.compound(frames, poses, SCALE, grid, mask, backend="numba", chunk=3, threads=2)
    torch_sums, torch_counts = rec.compound(frames, poses, SCALE, grid, mask, backend="torch", chunk=4)
    torch.testing.assert_close(numba_counts, torch_counts, rtol=0, atol=0)
    torch.testing.assert_close(numba_sums, torch_sums, rtol=0, atol=0)
    # every masked pixel landed in the fitted grid
    assert int(numba_counts.sum()) == len(frames) * mask.sum()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_compounding_matches_the_cpu():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (9, 40, 50), dtype=np.uint8)
    poses = sweep_poses(9, step_mm=0.31)
    grid = rec.fit_grid(poses, rec.mask_outline_mm(np.ones((40, 50), bool), SCALE), spacing=0.4)
    cpu_sums, cpu_counts = rec.compound(frames, poses, SCALE, grid)
    gpu_sums, gpu_counts = rec.compound(frames, poses, SCALE, grid, device="cuda")
    # float32 coordinates on the GPU may flip a pixel lying on a voxel boundary
    assert (gpu_counts.cpu() != cpu_counts).sum() <= 1e-3 * cpu_counts.numel()
    assert int(gpu_counts.sum()) == int(cpu_counts.sum())


@pytest.mark.parametrize("fit", rec.GRID_FITS)
def test_fitted_grid_holds_every_sector_pixel(fit):
    rng = np.random.default_rng(3)
    poses = sweep_poses(12, step_mm=1.3, tilt_deg=35)
    poses[:, :3, 3] += rng.normal(0, 5, (12, 3))
    mask = rec.probe_sector_mask(48, 64, (0.229389190673828 * 10, 0.220979690551758 * 10))
    scale = np.diag([0.229389190673828 * 10, 0.220979690551758 * 10, 1, 1])
    grid = rec.fit_grid(poses, rec.mask_outline_mm(mask, scale), spacing=1.0, fit=fit)
    frames = np.ones((12, 48, 64), np.uint8)
    _, counts = rec.compound(frames, poses, scale, grid, mask)
    assert int(counts.sum()) == 12 * mask.sum()
    assert abs(np.linalg.det(grid.direction) - 1) < 1e-9
    with pytest.raises(ValueError, match="voxels"):
        rec.fit_grid(poses, rec.mask_outline_mm(mask, scale), spacing=0.001)


@pytest.mark.parametrize("spacing", [1.0, 1e-9, 1e-300])
def test_grid_over_the_voxel_limit_is_refused_even_where_int64_wraps_around(spacing):
    # At 1 mm these extents need 2**22 x 2**21 x 2**21 voxels: an int64 product of exactly 2**64,
    # which wrapped to 0 and passed the limit (then the compounding loop wrote past its arrays);
    # 1e-9 wrapped to a negative count, 1e-300 overflows int64 in every axis.
    extent = np.array([2.0**22 - 1.5, 2.0**21 - 1.5, 2.0**21 - 1.5])
    outline = np.stack([np.zeros(3), extent], axis=1)  # [3, 2]: the box's opposite corners
    with pytest.raises(InputError, match=r"voxels at spacing .* \(limit 500,000,000\).*larger --spacing"):
        rec.fit_grid(np.eye(4)[None], outline, spacing=spacing)
    assert rec.grid_size([10.0, 5.0, 0.0], [0.5, 0.5, 0.5]) == (21, 11, 1)


def test_grid_voxel_count_is_exact_for_any_size():
    grid = rec.VolumeGrid([0, 0, 0], [1, 1, 1], (2**22, 2**21, 2**21), np.eye(3))  # never allocated
    assert grid.num_voxels == 2**64


def test_global_transforms_without_frame_zero_get_the_identity():
    poses = sweep_poses(5)
    relative = np.linalg.inv(poses[0]) @ poses  # T_{0<-i}, row 0 the identity
    full = rec.frames_to_reference(relative[1:], 5)
    np.testing.assert_allclose(full, relative, atol=1e-12)
    np.testing.assert_allclose(rec.frames_to_reference(torch.from_numpy(relative), 5), relative)
    with pytest.raises(ValueError, match="expected 4"):
        rec.frames_to_reference(relative[2:], 5)
    bad = relative.copy()
    bad[3, 0, 0] = np.nan
    with pytest.raises(ValueError, match="frame 3"):
        rec.frames_to_reference(bad, 5)


# --------------------------------------------------------------------------------------------
# Hole filling
# --------------------------------------------------------------------------------------------


def _check_fill(sampled, radius, slab):
    rng = np.random.default_rng(int(sampled.sum()))
    values = np.where(sampled, rng.uniform(10, 20, sampled.shape), 0.0).astype(np.float32)
    filled_values, filled = rec.fill_holes(torch.from_numpy(values), torch.from_numpy(sampled), radius=radius,
                                           slab=slab)
    filled = filled.numpy()
    # Euclidean voxel distance to a sampled voxel (scipy's transform is meaningless without one)
    distance = ndimage.distance_transform_edt(~sampled) if sampled.any() else np.full(sampled.shape, np.inf)
    # never beyond the radius, and exactly the voxels within it (the separable distance is exact)
    np.testing.assert_array_equal(filled, (~sampled) & (distance <= radius + 1e-9))
    out = filled_values.numpy()
    np.testing.assert_array_equal(out[sampled], values[sampled])
    assert (out[~sampled & ~filled] == 0).all()
    # weighted means of values in [10, 20] stay in [10, 20]
    assert ((out[filled] >= 10 - 1e-4) & (out[filled] <= 20 + 1e-4)).all()


@pytest.mark.parametrize("radius", [1.0, 1.5, 2.0, 2.9])
def test_hole_filling_fills_exactly_the_voxels_within_its_radius(radius):
    rng = np.random.default_rng(4)
    sampled = rng.random((23, 17, 19)) < 0.01
    sampled[5:7, :, :] = True  # a sampled slab next to a large empty region
    _check_fill(sampled, radius, slab=4)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), radius=st.floats(0.5, 3.5), slab=st.integers(1, 12),
       density=st.floats(0.001, 0.05))
def test_hole_filling_property(seed, radius, slab, density):
    sampled = np.random.default_rng(seed).random((9, 11, 13)) < density
    _check_fill(sampled, radius, slab)


def test_hole_filling_keeps_a_constant_and_is_off_at_radius_zero():
    sampled = np.zeros((6, 6, 6), bool)
    sampled[::3, ::3, ::3] = True
    values = np.full((6, 6, 6), 77.0, np.float32)
    out, filled = rec.fill_holes(values, sampled, radius=2.0)
    torch.testing.assert_close(out[filled], torch.full((int(filled.sum()),), 77.0))
    out, filled = rec.fill_holes(values, sampled, radius=0.0)
    assert not filled.any() and (out[torch.from_numpy(~sampled)] == 0).all()


# --------------------------------------------------------------------------------------------
# Export, comparison, point clouds, masks, transform files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_export_round_trip_keeps_spacing_origin_direction_and_values(tmp_path, suffix, dtype):
    import SimpleITK as sitk

    direction = rot_x(0.3) @ rot_y(-0.7)
    grid = rec.VolumeGrid([-12.5, 3.25, 40.0], [0.5, 0.7, 0.9], (7, 5, 4), direction)
    values = (np.random.default_rng(5).random(grid.shape) * 255).astype(dtype)
    path = rec.write_volume(tmp_path / f"volume{suffix}", values, grid)
    array, back = rec.read_volume(path)
    np.testing.assert_array_equal(array, values)
    assert array.dtype == dtype
    # NIfTI stores the geometry in float32
    np.testing.assert_allclose(back.spacing, grid.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, grid.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, grid.direction, atol=1e-5)
    # ITK (and so 3D Slicer) puts voxel (i, j, k) where the grid does
    image = sitk.ReadImage(str(path))
    for index in [(0, 0, 0), (6, 4, 3), (2, 1, 3)]:
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), grid.voxel_points(index)[0], atol=1e-4)
    assert not list(tmp_path.glob("*.partial*"))


def test_ncc_is_one_with_itself_and_lower_with_a_shifted_copy():
    rng = np.random.default_rng(6)
    volume = ndimage.gaussian_filter(rng.random((20, 22, 24)), 1.5)
    assert rec.normalized_cross_correlation(volume, volume) == pytest.approx(1.0)
    assert rec.normalized_cross_correlation(volume, 3 * volume + 7) == pytest.approx(1.0)
    assert rec.normalized_cross_correlation(volume, -volume) == pytest.approx(-1.0)
    shifted = np.roll(volume, 2, axis=2)
    inner = np.zeros(volume.shape, bool)
    inner[:, :, 3:-3] = True
    assert rec.normalized_cross_correlation(volume, shifted, inner) < 0.9
    assert math.isnan(rec.normalized_cross_correlation(volume, shifted, np.zeros(volume.shape, bool)))
    with pytest.raises(ValueError, match="one grid"):
        rec.normalized_cross_correlation(volume, volume[1:])


def test_compare_volumes_and_point_cloud(tmp_path):
    poses = sweep_poses(20)
    centre = np.array([9.0, 9.0, 2.0])
    frames = render(poses, 72, 72, lambda p: np.linalg.norm(p - centre, axis=1) <= 3.0)
    truth = rec.reconstruct(frames, poses, SCALE, spacing=0.5)
    moved = poses.copy()
    moved[:, 0, 3] += np.linspace(0, 1.5, 20)  # a drifting pose error
    other = rec.reconstruct(frames, moved, SCALE, grid=truth.grid)
    same = rec.compare_volumes(truth, truth)
    assert same["ncc"] == pytest.approx(1.0) and same["overlap_fraction"] == 1.0
    drift = rec.compare_volumes(truth, other)
    assert drift["ncc"] < 0.99 and 0 < drift["overlap_fraction"] < 1
    points, values = rec.bright_points(truth, 120)
    assert len(points) > 0 and (values >= 120).all()
    assert np.linalg.norm(points.mean(axis=0) - centre) < 0.5
    path = rec.write_point_cloud(tmp_path / "points.ply", points, values)
    data = path.read_bytes()
    header, body = data.split(b"end_header\n", 1)
    assert f"element vertex {len(points)}".encode() in header
    back = np.frombuffer(body, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4")])
    np.testing.assert_allclose(np.stack([back["x"], back["y"], back["z"]], 1), points, atol=1e-4)


def test_orthogonal_slices_png(tmp_path):
    poses = sweep_poses(10)
    frames = render(poses, 40, 48, lambda p: p[:, 1] > 5)
    truth = rec.reconstruct(frames, poses, SCALE, spacing=0.5)
    path = rec.plot_orthogonal_slices({"true": truth, "again": truth}, tmp_path / "slices.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mask_from_frames_finds_the_field_and_drops_thin_lines():
    rng = np.random.default_rng(7)
    height, width = 60, 80
    ys, xs = np.mgrid[0:height, 0:width]
    field = (xs - 40) ** 2 + (ys + 10) ** 2 < 55**2
    field &= ys > 2
    frames = np.where(field, rng.integers(0, 256, (5, height, width)), 0).astype(np.uint8)
    frames[:, 58, 2:30] = 255  # a one-pixel text line outside the field
    mask = rec.mask_from_frames(frames, chunk=2)
    eroded = ndimage.binary_erosion(field, iterations=1, border_value=0)
    assert (mask & ~field).sum() == 0  # nothing outside the field (the line is gone)
    assert (eroded & ~mask).sum() <= 0.01 * eroded.sum()
    with pytest.raises(ValueError, match="no ultrasound field"):
        rec.mask_from_frames(np.zeros((2, 10, 10), np.uint8))


def test_mask_runs_and_outline():
    mask = np.zeros((5, 7), bool)
    mask[1, 2:5] = True
    mask[3, 0:2] = True
    mask[3, 4:7] = True
    rows, starts, ends = rec.mask_runs(mask)
    assert rows.tolist() == [1, 3, 3] and starts.tolist() == [2, 0, 4] and ends.tolist() == [5, 2, 7]
    outline = rec.mask_outline_mm(mask, np.diag([2.0, 3.0, 1, 1]))
    assert outline.shape[0] == 4 and outline[0].min() == 2.0 and outline[0].max() == 14.0


def test_read_transforms_file(tmp_path):
    poses = sweep_poses(6)
    relative = np.linalg.inv(poses[0]) @ poses
    np.save(tmp_path / "g.npy", relative[1:].astype(np.float32))
    np.testing.assert_allclose(rec.read_transforms_file(tmp_path / "g.npy", 6), relative, atol=1e-5)
    with h5py.File(tmp_path / "g.h5", "w") as handle:
        handle["global_transforms"] = relative
        handle["other"] = np.zeros(3)
    np.testing.assert_allclose(rec.read_transforms_file(tmp_path / "g.h5", 6), relative, atol=1e-12)
    # tracker poses: tforms[i] = T_cam<-image[i] C^-1, so T_{0<-i} comes back
    calib = np.eye(4)
    calib[:3, :3] = rot_y(0.4)
    calib[:3, 3] = [3, -2, 5]
    with h5py.File(tmp_path / "t.h5", "w") as handle:
        handle["tforms"] = poses @ np.linalg.inv(calib)
    np.testing.assert_allclose(rec.read_transforms_file(tmp_path / "t.h5", 6, calib), relative, atol=1e-9)
    with pytest.raises(ValueError, match="g.npy"):
        rec.read_transforms_file(tmp_path / "g.npy", 9)
    with pytest.raises(FileNotFoundError):
        rec.read_transforms_file(tmp_path / "missing.npy", 6)


def _scaled(tforms):
    tforms[3, :3, :3] *= 1.1  # R^T R = 1.21 I


def _bad_last_row(tforms):
    tforms[3, 3, 1] = 0.5


def _reflected(tforms):
    tforms[3, :3, 2] *= -1


def _not_finite(tforms):
    tforms[3, 0, 0] = np.nan


@pytest.mark.parametrize("damage, message", [
    (_scaled, r"frame 3 \(row 2 of the file.* max \|R\^T R - I\| = 0.21 > 0.001"),
    (_bad_last_row, r"frame 3 \(row 2 of the file.* last row \[0.0, 0.5, 0.0, 1.0\] \(off by 0.5"),
    (_reflected, r"frame 3 \(row 2 of the file.* det = -1, expected \+1"),
    (_not_finite, r"frame 3 has non-finite values"),
])
def test_read_transforms_file_refuses_transforms_that_are_not_rigid(tmp_path, damage, message):
    poses = sweep_poses(6)
    relative = np.linalg.inv(poses[0]) @ poses  # T_{0<-i}
    damage(relative)
    np.save(tmp_path / "pred.npy", relative[1:])  # row 2 of the file is frame 3
    with pytest.raises(InputError, match="pred.npy: .*" + message):
        rec.read_transforms_file(tmp_path / "pred.npy", 6)
    with h5py.File(tmp_path / "pred.h5", "w") as handle:
        handle["global_transforms"] = relative
    with pytest.raises(InputError, match=message.replace("row 2", "row 3")):
        rec.read_transforms_file(tmp_path / "pred.h5", 6)


def test_read_transforms_file_refuses_tracker_poses_that_are_not_rigid(tmp_path):
    poses = sweep_poses(6)
    poses[4, :3, :3] *= 2
    with h5py.File(tmp_path / "t.h5", "w") as handle:
        handle["tforms"] = poses
    with pytest.raises(InputError, match=r"t.h5: 'tforms' frame 4 is not a rigid pose: max \|R\^T R - I\| = 3"):
        rec.read_transforms_file(tmp_path / "t.h5", 6, np.eye(4))


def _write_h5_string(path):
    with h5py.File(path, "w") as handle:
        handle["global_transforms"] = "T_0<-i"


@pytest.mark.parametrize("name, write, message", [
    ("text.npy", lambda path: path.write_text("1 0 0 0\n0 1 0 0\n"), "not a .npy file"),
    ("archive.npy", lambda path: np.savez(open(path, "wb"), a=np.eye(4)), "not a .npy file"),
    ("objects.npy", lambda path: np.save(path, np.array([{}]), allow_pickle=True), "unreadable .npy file"),
    ("words.npy", lambda path: np.save(path, np.array(["a", "b"])), "holds <U1 values"),
    ("text.h5", lambda path: path.write_text("not hdf5\n"), "not a readable HDF5 file"),
    ("strings.h5", _write_h5_string, r"holds \|S6 values of shape \(\)"),
])
def test_read_transforms_file_names_a_file_of_the_wrong_kind(tmp_path, name, write, message):
    write(tmp_path / name)
    with pytest.raises(InputError, match=f"{name}: {message}.*expected .*4, 4\\]"):
        rec.read_transforms_file(tmp_path / name, 6)


# --------------------------------------------------------------------------------------------
# The command line, on a simulated scan and on the real PLUS scans
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from simulation.dataset import generate_dataset

    root = tmp_path_factory.mktemp("tiny_recon")
    generate_dataset(root, "tiny", seed=1, subjects=1)
    return root


def test_cli_reconstructs_compares_and_scores_a_simulated_scan(tmp_path, tiny_dataset):
    import reconstruct

    prediction = tmp_path / "pred"
    prediction.mkdir()
    # a "prediction" that is the truth shifted by 2 mm: its volume differs, its files are read
    from utils.calibration import load_calibration
    from utils.challenge_data import find_scans, read_scan

    (ref,) = [r for r in find_scans(tiny_dataset) if r.name == "LH_rotation"]
    scan = read_scan(ref)
    calib = load_calibration(tiny_dataset / "calib_matrix.csv").calib_R_T
    tforms = scan.tforms.astype(np.float64)
    truth = np.linalg.inv(calib) @ np.linalg.inv(tforms[0]) @ tforms @ calib  # T_{0<-i}
    shifted = truth.copy()
    shifted[1:, 0, 3] += 2.0
    np.save(prediction / f"{ref.key}.npy", shifted[1:])

    run = reconstruct.main(["--data", str(tiny_dataset), "--scan", "000/LH_rotation", "--transforms", str(prediction),
                            "--drift", "--points", "p99", "--spacing", "1.0", "--out", str(tmp_path / "runs")])
    assert run.name == "000-reconstruct"
    with open(run / "summary.csv") as handle:
        rows = {row["poses"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"true", "pred", "drift"}
    assert float(rows["pred"]["ncc"]) < 0.999 and float(rows["pred"]["outline_error_mean_mm"]) > 1.9
    assert rows["true"]["mask"] == "probe"
    assert float(rows["true"]["sampled_fraction"]) > 0
    for label in ("true", "pred", "drift"):
        for suffix in (".mha", ".nii.gz"):
            array, grid = rec.read_volume(run / f"{ref.key}_{label}{suffix}")
            assert array.dtype == np.uint8 and np.allclose(grid.spacing, 1.0)
        assert (run / f"{ref.key}_{label}_points.ply").is_file()
    assert (run / f"{ref.key}_slices.png").is_file() and (run / "log.txt").is_file()
    assert "bone_mean_mm" in rows["true"]  # the phantom is known: the bone score ran
    assert (run / f"{ref.key}_drift_bone_points.ply").is_file()
    assert not list(run.glob("*.partial*"))


def test_cli_rejects_bad_arguments(tmp_path, tiny_dataset):
    import reconstruct

    with pytest.raises(ValueError, match="--scan 'nope'"):
        reconstruct.main(["--data", str(tiny_dataset), "--scan", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        reconstruct.main(["--data", str(tiny_dataset), "--spacing", "1", "2", "--out", str(tmp_path)])
    np.save(tmp_path / "one.npy", np.tile(np.eye(4), (23, 1, 1)))
    with pytest.raises(SystemExit):  # one file for two scans
        reconstruct.main(["--data", str(tiny_dataset), "--transforms", str(tmp_path / "one.npy"),
                          "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="one.npy"):  # 23 transforms for 24 frames is right; 22 is not
        np.save(tmp_path / "one.npy", np.tile(np.eye(4), (22, 1, 1)))
        reconstruct.main(["--data", str(tiny_dataset), "--scan", "LH_rotation", "--transforms",
                          str(tmp_path / "one.npy"), "--formats", "--out", str(tmp_path)])


def _cli_error(argv, capsys) -> str:
    """Run reconstruct.py's command line in-process as a shell would (``run_cli``); its one-line stderr."""
    import reconstruct
    from utils.cli import run_cli

    status = run_cli(reconstruct.main, argv)
    err = capsys.readouterr().err
    assert status != 0 and err.count("\n") == 1 and err.startswith(f"{sys.argv[0].split('/')[-1]}: error: "), err
    return err


def _write_bad_input(tmp_path, kind) -> list:
    """Files for a CLI case of ``kind``; returns the arguments that use them."""
    if kind == "scaled":  # LH_rotation of the tiny preset has 24 frames: 23 T_{0<-i}
        tforms = np.tile(np.eye(4), (23, 1, 1))
        tforms[4, :3, :3] *= 1.05
        np.save(tmp_path / "scaled.npy", tforms)
        return ["--transforms", str(tmp_path / "scaled.npy")]
    if kind == "text.npy":
        (tmp_path / "text.npy").write_text("1 0 0 0\n")
        return ["--transforms", str(tmp_path / "text.npy")]
    if kind == "text.h5":
        (tmp_path / "text.h5").write_text("not hdf5\n")
        return ["--transforms", str(tmp_path / "text.h5")]
    if kind == "mask":
        np.save(tmp_path / "mask.npy", np.ones((5, 5), bool))
        return ["--mask", str(tmp_path / "mask.npy")]
    raise AssertionError(kind)


@pytest.mark.parametrize("argv, message", [
    (["--spacing", "1e-9"], r"voxels at spacing \[1e-09, 1e-09, 1e-09\] mm \(limit 500,000,000\).*larger --spacing"),
    (["--spacing", "1e-6"], r"= \d\.\d+e\+2\d voxels at spacing \[1e-06"),
    (["--spacing", "3e-5"], r"voxels at spacing \[3e-05"),
    (["--spacing", "nan"], r"--spacing nan: expected 1 or 3 positive, finite"),
    (["--spacing", "0"], r"--spacing 0.0: expected"),
    ("scaled", r"scaled.npy: the transform of frame 5 \(row 4 of the file.* max \|R\^T R - I\| = 0.10"),
    ("text.npy", r"text.npy: not a .npy file"),
    ("text.h5", r"text.h5: not a readable HDF5 file"),
    ("mask", r"mask.npy: shape \(5, 5\)"),
])
def test_cli_refuses_bad_input_in_one_line_before_making_a_run_folder(tmp_path, tiny_dataset, capsys, argv,
                                                                     message):
    import re

    if isinstance(argv, str):
        argv = _write_bad_input(tmp_path, argv)
    runs = tmp_path / "runs"
    err = _cli_error(["--data", str(tiny_dataset), "--scan", "000/LH_rotation", *argv, "--formats",
                      "--out", str(runs)], capsys)
    assert re.search(message, err), err
    assert not runs.exists() or not list(runs.iterdir())


def test_cli_checks_every_scan_before_reconstructing_the_first(tmp_path, tiny_dataset, capsys):
    import shutil

    from utils.challenge_data import find_scans

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (second,) = [r for r in find_scans(data) if r.name == "RH_rotation"]
    with h5py.File(second.tforms_path, "r+") as handle:
        handle["tforms"][3, :3, :3] *= 2
    runs = tmp_path / "runs"
    err = _cli_error(["--data", str(data), "--scan", "LH_rotation", "--scan", "RH_rotation", "--formats",
                      "--out", str(runs)], capsys)
    assert "RH_rotation.h5: 'tforms' frame 3 is not a rigid pose" in err
    # a folder of transforms that lacks the second scan's file is refused up front too
    (tmp_path / "pred").mkdir()
    np.save(tmp_path / "pred" / "sub000__LH_rotation.npy", np.tile(np.eye(4), (23, 1, 1)))
    err = _cli_error(["--data", str(tiny_dataset), "--transforms", str(tmp_path / "pred"), "--formats",
                      "--out", str(runs)], capsys)
    assert "no sub000__RH_rotation.npy" in err
    assert not runs.exists() or not list(runs.iterdir())


@pytest.mark.parametrize("wrote_result", [False, True])
def test_cli_removes_a_failed_run_folder_that_holds_only_its_log(tmp_path, tiny_dataset, monkeypatch, wrote_result):
    import reconstruct

    def failing(plan, root, calibration, args, run_dir):
        if wrote_result:
            (run_dir / f"{plan.ref.key}_true.mha").write_bytes(b"volume")
        raise InputError("no ultrasound field")  # what a mask from the frames may find after the folder exists

    monkeypatch.setattr(reconstruct, "reconstruct_one", failing)
    with pytest.raises(InputError, match="no ultrasound field"):
        reconstruct.main(["--data", str(tiny_dataset), "--scan", "LH_rotation", "--out", str(tmp_path)])
    run = tmp_path / "000-reconstruct"
    if wrote_result:  # a result is kept, with the log that says how the run ended
        assert sorted(p.name for p in run.iterdir()) == ["log.txt", "sub000__LH_rotation_true.mha"]
    else:
        assert not run.exists()


def test_cli_on_the_real_plus_scans(tmp_path, realdata_dir):
    import reconstruct

    for name in ("plus_spine_phantom", "plus_bone_l14"):
        run = reconstruct.main(["--data", str(realdata_dir / name), "--spacing", "0.5", "--formats", "mha",
                                "--out", str(tmp_path)])
        with open(run / "summary.csv") as handle:
            (row,) = list(csv.DictReader(handle))
        assert row["mask"] == "frames" and int(row["frames"]) == 21 and int(row["width"]) == 820
        assert float(row["sampled_fraction"]) > 0.05
        array, grid = rec.read_volume(next(run.glob("*_true.mha")))
        assert array.max() > 100 and np.allclose(grid.direction, np.eye(3))
