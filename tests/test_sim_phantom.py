"""The digital forearm (simulation/phantom.py): anatomy by label, scatterer sets, attenuation, parameters."""

import dataclasses
import json
import logging
import resource
import time

import numpy as np
import pytest

from simulation.phantom import ForearmPhantom, Label, PhantomParameters, sample_parameters
from simulation.tissue import bin_scatterers

MUSCLE_BLOCK = [[100.0, -6.0, 14.0], [120.0, 6.0, 22.0]]  # under the fascia, above the bones, for seed 0


def _phantom(seed=0, side="R", **kwargs):
    return ForearmPhantom(sample_parameters(np.random.default_rng(seed), side, **kwargs))


def test_parameters_are_deterministic_and_differ_by_subject_and_arm():
    right = sample_parameters(np.random.default_rng(3), "R")
    assert right == sample_parameters(np.random.default_rng(3), "R")
    left = sample_parameters(np.random.default_rng(3), "L")
    other = sample_parameters(np.random.default_rng(4), "R")
    assert left.side == "L" and left.half_width_mm != right.half_width_mm
    assert other.half_width_mm != right.half_width_mm and other.radius_y_mm != right.radius_y_mm
    # the two arms of a subject are close (asymmetry), two subjects need not be
    assert abs(left.half_width_mm / right.half_width_mm - 1) < 0.15
    with pytest.raises(ValueError, match="side"):
        sample_parameters(np.random.default_rng(0), "X")


def test_parameters_round_trip_through_json():
    params = sample_parameters(np.random.default_rng(5), "L")
    text = json.dumps(params.to_dict())
    assert PhantomParameters.from_dict(json.loads(text)) == params
    with pytest.raises(ValueError, match="unknown"):
        PhantomParameters.from_dict({**params.to_dict(), "elbow": 1})


@pytest.mark.parametrize("seed", range(16))
def test_sampled_anatomy_is_consistent(seed):
    params = sample_parameters(np.random.default_rng(seed), "R")
    phantom = ForearmPhantom(params)
    x = np.linspace(0, params.length_mm, 26)
    (ry, rz, rr), (uy, uz, ur) = phantom._bone_axes(x)
    # the bones stay apart and inside the skin
    assert np.all(np.hypot(ry - uy, rz - uz) > rr + ur + 0.5)
    for yc, zc, r in ((ry, rz, rr), (uy, uz, ur)):
        sd, _ = phantom._outer(x, yc, zc)
        assert np.all(sd < -r - 1.0)
    # every vessel's centre line is lumen all along the arm (arteries are kept clear of the bones)
    for yc, zc, _ in phantom._vessel_centres(x):
        assert np.all(phantom.labels(np.stack([x, yc, zc], axis=1)) == Label.VESSEL)
    # ranges of SIMULATOR.md's table (the global scale stretches them by up to ~20 %)
    assert 0.8 <= params.scale <= 1.25
    assert 36 * 0.75 <= params.half_width_mm <= 46 * 1.3 and 28 * 0.75 <= params.half_thickness_mm <= 36 * 1.3
    assert 1.5 <= params.fat_mm <= 12 and 1 <= len(params.veins) <= 2 and 4 <= len(params.septa) <= 8
    assert 20 <= params.radius_depth_mm[0] <= 50 and 5 <= params.radius_depth_mm[1] <= 25


def test_labels_along_the_centre_line():
    phantom = _phantom()
    p = phantom.params
    depth = np.array([0.3 * p.skin_mm, p.skin_mm + 0.5 * p.fat_mm * (1 - p.fat_variation), 25.0])
    # at the centre line the local fat thickness is within fat_mm * (1 +- fat_variation)
    deep = p.skin_mm + p.fat_mm * (1 + p.fat_variation) + p.fascia_mm + 1.0
    depth[2] = max(depth[2], deep)
    pts = np.stack([np.full(3, 100.0), np.zeros(3), depth], axis=1)
    labels = phantom.labels(pts)
    assert labels[0] == Label.SKIN and labels[1] == Label.FAT and labels[2] in (Label.MUSCLE, Label.SEPTUM)
    assert labels.dtype == np.uint8
    below = 2 * p.half_thickness_mm + 5
    outside = np.array([[100.0, 0.0, -1.0], [100.0, 0.0, below], [-5.0, 0.0, 10.0], [p.length_mm + 5, 0, 10.0]])
    assert np.all(phantom.labels(outside) == Label.OUTSIDE)


@pytest.mark.parametrize("side", ["R", "L"])
def test_bone_axes_and_vessel_centres_are_labelled(side):
    phantom = _phantom(1, side)
    p = phantom.params
    mirror = -1 if side == "L" else 1
    x = np.linspace(5, p.length_mm - 5, 20)
    for yc, zc, _ in phantom._bone_axes(x):
        pts = np.stack([x, mirror * yc, zc], axis=1)
        assert np.all(phantom.labels(pts) == Label.BONE)
        assert np.all(phantom.bone_surface_distance(pts) > 4.0)
    centres = phantom._vessel_centres(x)
    assert len(centres) == len(p.arteries) + len(p.veins)
    for k, (yc, zc, _) in enumerate(centres[: len(p.arteries)]):
        # the artery centre lines are the parameters' straight lines plus a 1.5 mm meander
        line = p.arteries[k][0] + (p.arteries[k][1] - p.arteries[k][0]) * x / p.length_mm
        assert np.all(np.abs(yc - line) <= 1.5 + 1e-9)
    for yc, zc, _ in centres:
        assert np.all(phantom.labels(np.stack([x, mirror * yc, zc], axis=1)) == Label.VESSEL)
    # parameters are stored for a right arm (radius at -Y); a left arm mirrors them (radius at +Y)
    assert p.radius_y_mm[0] < 0 < p.ulna_y_mm[0]
    (radius_y, radius_z, _), _ = phantom._bone_axes(np.array([50.0]))
    radius_point = [[50.0, mirror * radius_y[0], radius_z[0]]]
    assert phantom.labels(radius_point)[0] == Label.BONE and mirror * radius_point[0][1] < 0


def test_bone_surface_distance_is_zero_on_the_surface():
    phantom = _phantom(2)
    x = np.full(64, 60.0)
    angle = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    (yc, zc, r), _ = phantom._bone_axes(x)
    for offset in (0.0, 2.0):
        pts = np.stack([x, yc + (r + offset) * np.cos(angle), zc + (r + offset) * np.sin(angle)], axis=1)
        np.testing.assert_allclose(phantom.bone_surface_distance(pts), offset, atol=1e-9)


@pytest.mark.parametrize("side", ["R", "L"])
def test_skin_surface_point_and_normal(side):
    phantom = _phantom(3, side)
    x = np.array([10.0, 80.0, 150.0, 240.0])
    y = np.array([0.0, -12.0, 15.0, 5.0])
    point, normal = phantom.skin_surface(x, y)
    assert point.shape == normal.shape == (4, 3)
    np.testing.assert_allclose(point[:, :2], np.stack([x, y], 1))
    np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1.0, atol=1e-12)
    assert np.all(normal[:, 2] < -0.5)  # outward from the volar skin: towards -Z
    assert np.all(phantom.labels(point + 0.05 * normal) == Label.OUTSIDE)
    assert np.all(phantom.labels(point - 0.05 * normal) == Label.SKIN)
    assert point[0, 2] == pytest.approx(0.0, abs=1e-12)  # Z = 0 on the centre line
    single_point, single_normal = phantom.skin_surface(80.0, -12.0)
    np.testing.assert_allclose(single_point, point[1])
    with pytest.raises(ValueError, match="half-width"):
        phantom.skin_surface(10.0, 500.0)


def test_left_arm_mirrors_the_right_one():
    right = sample_parameters(np.random.default_rng(7), "R", asymmetry=0.0)
    left = sample_parameters(np.random.default_rng(7), "L", asymmetry=0.0)
    assert dataclasses.replace(left, side="R") == right
    pts = np.random.default_rng(0).uniform([0, -50, -2], [250, 50, 80], size=(20000, 3))
    mirrored = pts * [1, -1, 1]
    np.testing.assert_array_equal(ForearmPhantom(left).labels(mirrored), ForearmPhantom(right).labels(pts))
    # with the default asymmetry the arms differ a little
    labels_l = _phantom(7, "L").labels(mirrored)
    labels_r = _phantom(7, "R").labels(pts)
    assert 0.0 < np.mean(labels_l != labels_r) < 0.3


def test_scatterer_density_bins_and_normals():
    phantom = _phantom()
    density = 8.0
    scatterers = phantom.make_scatterers(density, np.random.default_rng(1), region=MUSCLE_BLOCK, bin_size=2.0)
    m = len(scatterers)
    volume = np.prod(np.diff(MUSCLE_BLOCK, axis=0))
    labels = phantom.labels(scatterers.positions)
    assert np.all(np.isin(labels, [Label.MUSCLE, Label.SEPTUM]))  # the block holds only muscle
    assert abs(m / volume / density - 1) < 4 / np.sqrt(density * volume)  # Poisson: 4 sigma
    _check_bins(scatterers)
    assert scatterers.positions.dtype == np.float32 and scatterers.amplitudes.dtype == np.complex64
    assert scatterers.normals.dtype == np.float32


def _check_bins(s):
    nx, ny, nz = s.bin_shape
    start = s.bin_start
    assert start[0] == 0 and start[-1] == len(s) and np.all(np.diff(start) >= 0) and start.size == nx * ny * nz + 1
    flat = np.repeat(np.arange(nx * ny * nz), np.diff(start))
    index = np.stack([flat // (ny * nz), flat // nz % ny, flat % nz], axis=1)
    low = s.bin_origin + index * np.float32(s.bin_size)
    assert np.all(s.positions >= low - 1e-4) and np.all(s.positions <= low + s.bin_size + 1e-4)


def test_whole_cross_section_has_every_tissue_and_specular_normals():
    phantom = _phantom(1)
    region = [[90.0, -60.0, -5.0], [96.0, 60.0, 90.0]]
    s = phantom.make_scatterers(3.0, np.random.default_rng(2), region=region)
    _check_bins(s)
    labels = phantom.labels(s.positions)
    assert set(np.unique(labels)) == {int(k) for k in Label if k != Label.OUTSIDE}
    norm = np.linalg.norm(s.normals, axis=1)
    # skin, fascia and bone are specular (unit normals), but fascia and cortex are rough: every other
    # one of their scatterers is diffuse (zero normal, phantom._ROUGH_DIFFUSE_DB); all else diffuse
    interfaces = np.isin(labels, [Label.SKIN, Label.FASCIA, Label.BONE])
    np.testing.assert_allclose(norm[interfaces & (norm > 0)], 1.0, atol=1e-5)
    assert np.all(norm[~interfaces] == 0) and np.all(norm[labels == Label.SKIN] > 0)
    for rough in (Label.FASCIA, Label.BONE):
        assert 0.4 < np.mean(norm[labels == rough] > 0) < 0.6
    # bone scatterers only in the shell under the surface (phantom._BONE_SHELL_MM = 1 mm): nothing inside
    shell = phantom.bone_surface_distance(s.positions[labels == Label.BONE])
    assert np.all(shell <= 1.0 + 1e-3)  # labels use tabulated shapes: < 0.001 mm off
    # bone normals point away from the bone axis, fascia normals out of the arm (volar: -Z)
    bone = (labels == Label.BONE) & (norm > 0)
    pos, normals = s.positions[bone].astype(np.float64), s.normals[bone]
    axes = phantom._bone_axes(pos[:, 0])
    gaps = np.stack([np.abs(np.hypot(pos[:, 1] - yc, pos[:, 2] - zc) - r) for yc, zc, r in axes])
    nearest = np.argmin(gaps, axis=0)
    centre_y, centre_z = np.choose(nearest, [a[0] for a in axes]), np.choose(nearest, [a[1] for a in axes])
    radial = np.stack([pos[:, 1] - centre_y, pos[:, 2] - centre_z], axis=1)
    radial /= np.linalg.norm(radial, axis=1, keepdims=True)
    assert np.all(np.sum(radial * normals[:, 1:], axis=1) > 0.95)
    fascia = (labels == Label.FASCIA) & (np.abs(s.positions[:, 1]) < 5) & (norm > 0)
    assert np.all(s.normals[fascia & (s.positions[:, 2] < 30), 2] < -0.9)
    # echo levels in order: bone > fascia > skin > muscle > fat > vessel (mean power per label)
    power = {k: np.mean(np.abs(s.amplitudes[labels == k]) ** 2) for k in Label if k != Label.OUTSIDE}
    order = [Label.BONE, Label.FASCIA, Label.SKIN, Label.MUSCLE, Label.FAT, Label.VESSEL]
    assert all(power[a] > power[b] for a, b in zip(order, order[1:]))


def test_scatterers_are_deterministic_for_a_seed():
    phantom = _phantom()
    a = phantom.make_scatterers(2.0, np.random.default_rng(9), region=MUSCLE_BLOCK)
    b = ForearmPhantom(phantom.params).make_scatterers(2.0, np.random.default_rng(9), region=MUSCLE_BLOCK)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.amplitudes, b.amplitudes)


def test_medium_attenuation():
    phantom = _phantom(1)
    p = phantom.params
    region = [[100.0, -60.0, -5.0], [104.0, 60.0, 90.0]]
    medium = phantom.medium(0.5, region=region)
    att = medium.attenuation
    box = phantom.bounding_box()  # the region is clipped to the arm's box
    expected = np.ceil((np.minimum(box[1], region[1]) - np.maximum(box[0], region[0])) / 0.5 - 1e-9).astype(int)
    assert att.dtype == np.float32 and att.shape == tuple(expected) and att.shape[0] == 8
    centres = medium.origin + medium.spacing * np.stack(np.meshgrid(*[np.arange(n) for n in att.shape], indexing="ij"), -1)
    labels = phantom.labels(centres.reshape(-1, 3)).reshape(att.shape)
    assert np.all(att[labels == Label.OUTSIDE] == 0)
    bone, muscle = att[labels == Label.BONE], att[labels == Label.MUSCLE]
    assert bone.min() > 8 * muscle.max()
    np.testing.assert_allclose(muscle, 0.9 * p.attenuation_scale, rtol=1e-6)


def test_bin_scatterers_helper():
    rng = np.random.default_rng(0)
    pos = rng.uniform(-3, 7, size=(5000, 3))
    s = bin_scatterers(pos, np.arange(5000), np.zeros((5000, 3)), bin_size=1.5)
    _check_bins(s)
    assert s.bin_origin.tolist() == [-3.0, -3.0, -3.0]  # the lowest point (> -3) rounded down to a bin multiple
    assert sorted(s.amplitudes.real.astype(int).tolist()) == list(range(5000))


@pytest.mark.slow
def test_report_time_and_memory_for_8m_scatterers(caplog):
    """Reports (never asserts) the cost of a full-size scatterer set."""
    phantom = _phantom()
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = phantom.make_scatterers(12.8, np.random.default_rng(0))  # the whole arm: ~8 M for this subject
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logging.getLogger(__name__).warning(
        "%d scatterers in %.1f s, ru_maxrss %d MB (before %d MB)", len(s), seconds, peak // 1024, before // 1024
    )
    assert len(s) > 1_000_000
