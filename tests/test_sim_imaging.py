"""Image formation (simulation/imaging.py) against the physics it must reproduce (SIMULATOR.md).

Phantoms here are uniform blocks of Poisson scatterers placed in a tissue frame equal to the image-mm
frame at the identity pose, so in the probe frame ``x_p = X - X_a``, ``z_p = Y - Y_a``, ``y_p = -Z``.
Grids are reduced so the file runs in seconds.
"""

import math

import numpy as np
import pytest

from simulation.imaging import Renderer, RenderSettings
from simulation.probe import CurvilinearProbe, ImageGeometry
from simulation.tissue import Medium, bin_scatterers

SMALL_PIXEL_MM = (0.9175, 0.8839)  # 120x160 frames spanning the real 480x640 field of view


def uniform_block(low, high, density_per_mm3, echo_db=0.0, seed=0, bin_size=2.0):
    """Poisson scatterers, CN(0, 1) amplitudes times 10^(echo_db / 20), in the box [low, high] mm."""
    rng = np.random.default_rng(seed)
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    count = rng.poisson(density_per_mm3 * np.prod(high - low))
    positions = low + rng.random((count, 3)) * (high - low)
    amplitudes = (rng.standard_normal(count) + 1j * rng.standard_normal(count)) * (10 ** (echo_db / 20) / math.sqrt(2))
    return bin_scatterers(positions, amplitudes, np.zeros((count, 3)), bin_size)


def translation(x=0.0, y=0.0, z=0.0):
    tform = np.eye(4)
    tform[:3, 3] = (x, y, z)
    return tform


def uniform_medium(geometry, value=0.7):
    """Attenuation volume covering the sector (image mm = tissue frame), dB/cm/MHz."""
    # axes follow the tissue frame: X (columns), Y (depth), Z (elevation, +-20 mm)
    width_mm, height_mm = geometry.width * geometry.pixel_mm[0], geometry.height * geometry.pixel_mm[1]
    shape = (int(width_mm / 0.5) + 2, int(height_mm / 0.5) + 2, 81)
    return Medium(np.full(shape, value, dtype=np.float32), np.array([0.0, 0.0, -20.0], dtype=np.float32), 0.5)


@pytest.fixture(scope="module")
def small_scene():
    """The full 66 degree sector at 120x160 / 64 lines / 150 samples, filled with -6 dB "muscle"."""
    geometry = ImageGeometry(CurvilinearProbe(num_lines=64, num_samples=150), 120, 160, SMALL_PIXEL_MM)
    scatterers = uniform_block([0.0, 0.0, -7.0], [geometry.width * SMALL_PIXEL_MM[0], 100.0, 7.0], 10.0, echo_db=-6.0)
    return geometry, scatterers


@pytest.fixture(scope="module")
def focal_scene():
    """A block of 10 / mm^3 speckle around the 45 mm elevational focus, finely sampled (dr = 0.15 mm),
    wide enough in elevation for 16 independent planes 4 mm (> 9 sigma_el) apart."""
    probe = CurvilinearProbe(fov_deg=12.0, num_lines=96, num_samples=401, depth_mm=60.0)
    geometry = ImageGeometry(probe, 120, 160, (0.5, 0.5))
    x_a, y_a = geometry.apex_mm
    baselines = [4.0 * b for b in range(16)]
    scatterers = uniform_block([x_a - 10, y_a + 79, -6.0], [x_a + 10, y_a + 91, baselines[-1] + 6.0], 10.0, seed=1)
    depths = probe.ranges_mm() - probe.radius_mm
    rows = (depths >= 42.0) & (depths <= 48.0)  # the 45 mm focus +- 3 mm
    return Renderer(geometry, scatterers), baselines, depths[rows], rows


def _pooled_iq(renderer, poses, rows):
    """complex IQ on the crop's rows (edge lines dropped), pooled over poses."""
    return np.concatenate([renderer.iq(pose)[rows][:, 4:-4].ravel() for pose in poses])


def test_intensity_correlation_follows_the_elevational_beam_at_the_focus(focal_scene):
    # Elevational offset d of the image plane: IQ = sum a_s g_el(y_s) ... with g_el = exp(-y^2 / 2 sigma^2)
    # gives a complex correlation rho_IQ = exp(-d^2 / 4 sigma^2); for fully developed (circular Gaussian)
    # speckle the intensity |IQ|^2 correlates with |rho_IQ|^2 = exp(-d^2 / 2 sigma^2): SIMULATOR.md's law.
    # We therefore measure the correlation coefficient of the intensity, not of the envelope.
    renderer, baselines, depths, rows = focal_scene
    # image Z = -y_p: a translation along the image's Z axis is an elevational offset
    reference = np.abs(_pooled_iq(renderer, [translation(z=b) for b in baselines], rows)) ** 2
    sigma = renderer.probe.sigma_elevation_mm(depths)
    for offset in (0.25, 0.5, 1.0, 2.0):
        moved = np.abs(_pooled_iq(renderer, [translation(z=b + offset) for b in baselines], rows)) ** 2
        measured = np.corrcoef(reference, moved)[0, 1]
        expected = np.mean(np.exp(-(offset**2) / (2 * sigma**2)))  # averaged over the crop's depths
        assert measured == pytest.approx(expected, abs=0.05), f"d = {offset} mm"


def test_tilt_about_the_lateral_axis_decorrelates_through_the_phase(focal_scene):
    # Tilting the plane by t about the lateral axis moves a scatterer at elevation y by t y along the
    # beam: phase 2 k t y. Averaged over the elevational profile g_el^2 (variance sigma^2 / 2):
    # rho_IQ = exp(-(2 k t)^2 sigma^2 / 4), times exp(-d^2 / 4 sigma^2) for the elevational offset
    # d = t (depth - axis depth) of rows off the rotation axis. We compare the complex IQ correlation:
    # SIMULATOR.md's intensity law exp(-(2 k t)^2 sigma^2 / 2) = |rho_IQ|^2 needs fully developed speckle,
    # and at the focus 10 / mm^3 puts < 1 scatterer in a resolution cell, so a lone scatterer's intensity
    # survives a pure phase change (intensity correlation 0.88 where |rho_IQ|^2 = 0.76 at 2 degrees).
    renderer, baselines, depths, rows = focal_scene
    probe = renderer.probe
    x_a, y_a = renderer.geometry.apex_mm
    axis_y = y_a + probe.radius_mm + 45.0  # the rotation axis: image X through the focus
    reference = _pooled_iq(renderer, [translation(z=b) for b in baselines], rows)
    sigma = probe.sigma_elevation_mm(depths)
    k = 2 * np.pi / probe.wavelength_mm
    for degrees in (1.0, 2.0, 4.0):
        t = math.radians(degrees)
        rotation = np.eye(4)
        rotation[1:3, 1:3] = [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]  # about image X
        poses = [translation(y=axis_y, z=b) @ rotation @ translation(y=-axis_y) for b in baselines]
        tilted = _pooled_iq(renderer, poses, rows)
        measured = abs(np.vdot(reference, tilted)) / np.sqrt(np.vdot(reference, reference).real
                                                             * np.vdot(tilted, tilted).real)
        offset = t * (depths - 45.0)
        expected = np.mean(np.exp(-((2 * k * t) ** 2) * sigma**2 / 4 - offset**2 / (4 * sigma**2)))
        assert measured == pytest.approx(expected, abs=0.03), f"tilt {degrees} deg"


def test_mean_speckle_power_is_calibrated_at_every_depth():
    # The PSF is normalised so that a 0 dB tissue at the reference density has E|IQ|^2 = 1 whatever the
    # beam widths; power adds for random phases, so this holds at any density.
    probe = CurvilinearProbe(fov_deg=20.0, num_lines=64, num_samples=600)
    geometry = ImageGeometry(probe, 120, 160, SMALL_PIXEL_MM)
    x_a, _ = geometry.apex_mm
    scatterers = uniform_block([x_a - 50, 0.0, -7.0], [x_a + 50, 100.0, 7.0], 5.0, echo_db=-6.0, seed=2)
    power = np.abs(Renderer(geometry, scatterers).iq(np.eye(4))) ** 2
    depths = probe.ranges_mm() - probe.radius_mm
    expected = 5.0 / 10.0 * 10 ** (-6 / 10)
    for low in (5.0, 20.0, 40.0, 60.0, 80.0):
        band = power[(depths >= low) & (depths < low + 8.0)][:, 3:-3]
        assert band.mean() == pytest.approx(expected, rel=0.15), f"depth {low} mm"


def test_speckle_repeats_at_the_same_pose_and_changes_elsewhere(small_scene):
    geometry, scatterers = small_scene
    renderer = Renderer(geometry, scatterers, uniform_medium(geometry))
    pose = translation(x=0.3, z=0.2)
    first = renderer.render(pose, noise_seed=5)
    renderer.render(translation(x=4.0, z=-1.0), noise_seed=6)  # go away ...
    np.testing.assert_array_equal(renderer.render(pose, noise_seed=5), first)  # ... and come back
    inside = geometry.sector_mask()
    moved = renderer.render(translation(x=0.3, z=1.2), noise_seed=5)  # 1 mm elevational offset
    assert np.corrcoef(first[inside].astype(float), moved[inside].astype(float))[0, 1] < 0.9
    rebuilt = Renderer(geometry, scatterers, uniform_medium(geometry))  # nothing hidden in the first renderer
    np.testing.assert_array_equal(rebuilt.render(pose, noise_seed=5), first)


def test_frame_is_uint8_zero_outside_the_sector_and_lit_inside(small_scene):
    geometry, scatterers = small_scene
    image = Renderer(geometry, scatterers, uniform_medium(geometry)).render(np.eye(4), noise_seed=0)
    assert image.dtype == np.uint8 and image.shape == (120, 160)
    inside = geometry.sector_mask()
    assert (image[~inside] == 0).all()
    assert (image[inside] > 0).mean() > 0.97
    # TGC (0.7) cancels a uniform 0.7 dB/cm/MHz medium: -6 dB muscle stays near grey 80-100 at all depths
    rows = np.arange(geometry.height)
    for band in np.array_split(rows[inside.any(axis=1)], 4):
        assert 75 <= image[band][inside[band]].mean() <= 105


def test_where_there_is_no_tissue_the_frame_is_black_despite_the_tgc(small_scene):
    # Tissue (and its attenuation) only above image Y = 50 mm; below, the beam meets nothing. The TGC
    # rises to +76 dB at 9 cm, yet the noise floor stays far under black: no grey haze below the arm.
    geometry, scatterers = small_scene
    medium = uniform_medium(geometry)
    voxel_y = np.arange(medium.attenuation.shape[1]) * medium.spacing + medium.origin[1]
    attenuation = np.where((voxel_y < 50.0)[None, :, None], medium.attenuation, 0.0).astype(np.float32)
    kept = scatterers.positions[:, 1] < 50.0
    upper = bin_scatterers(scatterers.positions[kept], scatterers.amplitudes[kept], scatterers.normals[kept], 2.0)
    renderer = Renderer(geometry, upper, Medium(attenuation, medium.origin, medium.spacing))
    image = renderer.render(np.eye(4), noise_seed=0)
    y_mm = np.arange(1, geometry.height + 1) * geometry.pixel_mm[1]
    inside = geometry.sector_mask()
    assert (image[y_mm > 55.0] == 0).all()
    assert image[(y_mm < 45.0)[:, None] & inside].mean() > 60
    # the envelope helper refers the same noise back through the gain map: it reproduces the frame's levels
    envelope = renderer.envelope(np.eye(4), noise_seed=0)
    gain = renderer.gain_map_db(np.eye(4))
    grey = np.clip((20 * np.log10(envelope.astype(np.float64)) + gain + 83.0) / 83.0, 0, 1) * 255
    pixels, sample, line, w_sample, w_line = geometry.scan_conversion_table()
    converted = ((1 - w_sample) * ((1 - w_line) * grey[sample, line] + w_line * grey[sample, line + 1])
                 + w_sample * ((1 - w_line) * grey[sample + 1, line] + w_line * grey[sample + 1, line + 1]))
    assert np.abs(np.round(converted) - image.ravel()[pixels]).max() <= 1  # float32 rounding only


def test_in_plane_lateral_shift_moves_the_speckle_by_the_same_distance():
    probe = CurvilinearProbe(fov_deg=30.0, num_lines=128, num_samples=200, depth_mm=30.0)
    pixel = 0.15
    geometry = ImageGeometry(probe, 160, 160, (pixel, pixel))  # a 24 x 24 mm window below the face
    x_a, y_a = geometry.apex_mm
    scatterers = uniform_block([x_a - 15, y_a + 39, -3.0], [x_a + 15, y_a + 62, 3.0], 10.0, seed=3)
    renderer = Renderer(geometry, scatterers, settings=RenderSettings(gain_db=-30.0))
    reference = renderer.render(np.eye(4), noise_seed=0).astype(np.float64)
    rows = slice(67, 134)  # image Y 10-20 mm: 3-13 mm below the face
    cols = slice(50, 111)  # +-4.5 mm about the centre column; with the lags below, all inside the sector
    assert geometry.sector_mask()[rows, cols.start - 20:cols.stop + 20].all()
    patch = reference[rows, cols] - reference[rows, cols].mean()
    lags = np.arange(-20, 21)
    for shift in (0.35, 1.0, 2.2):
        # the probe moves +shift along image X, so fixed tissue appears at -shift in the new frame
        moved = renderer.render(translation(x=shift), noise_seed=0).astype(np.float64)
        scores = []
        for lag in lags:
            window = moved[rows, cols.start + lag:cols.stop + lag]
            scores.append(np.sum(patch * (window - window.mean())))
        best = int(np.argmax(scores))
        left, centre, right = scores[best - 1], scores[best], scores[best + 1]
        peak = lags[best] + 0.5 * (left - right) / (left - 2 * centre + right)  # parabolic sub-pixel peak
        assert -peak * pixel == pytest.approx(shift, abs=pixel), f"shift {shift} mm"


def test_bone_like_slab_casts_a_shadow(small_scene):
    geometry, scatterers = small_scene
    medium = uniform_medium(geometry)
    # a 4 mm thick slab at 25-29 mm image depth, 15 dB/cm/MHz, under the right half of the frame only
    x_a, _ = geometry.apex_mm
    voxel_x = np.arange(medium.attenuation.shape[0]) * medium.spacing + medium.origin[0]
    voxel_y = np.arange(medium.attenuation.shape[1]) * medium.spacing + medium.origin[1]
    attenuation = medium.attenuation.copy()
    attenuation[np.ix_(voxel_x > x_a + 5, (voxel_y > 25) & (voxel_y < 29), np.ones(attenuation.shape[2], bool))] = 15.0
    image = Renderer(geometry, scatterers, Medium(attenuation, medium.origin, medium.spacing)).render(
        np.eye(4), noise_seed=0).astype(np.float64)
    inside = geometry.sector_mask()
    x_mm = np.arange(1, geometry.width + 1) * geometry.pixel_mm[0]
    y_mm = np.arange(1, geometry.height + 1) * geometry.pixel_mm[1]
    right = inside & (x_mm[None, :] > x_a + 10)
    left = inside & (x_mm[None, :] < x_a - 5)
    above, below = (y_mm < 23)[:, None], ((y_mm > 33) & (y_mm < 70))[:, None]
    assert image[right & above].mean() > 60
    assert image[right & below].mean() < 0.1 * image[right & above].mean()  # 2 x 15 x 6 x 0.4 = 72 dB lost
    assert image[left & below].mean() > 60  # no shadow where the beam misses the slab


def test_an_interface_echo_is_not_attenuated_by_what_lies_behind_it(small_scene):
    """The bone surface must stay bright: the loss at depth r counts the medium in front of r only
    (with a small delay), so the shell echo is not dimmed by the bone it covers."""
    geometry, scatterers = small_scene
    medium = uniform_medium(geometry)
    x_a, y_a = geometry.apex_mm
    voxel_y = np.arange(medium.attenuation.shape[1]) * medium.spacing + medium.origin[1]
    attenuation = medium.attenuation.copy()
    attenuation[:, voxel_y > 25, :] = 15.0  # bone from 25 mm image depth down
    renderer = Renderer(geometry, scatterers, Medium(attenuation, medium.origin, medium.spacing))
    gain = renderer.gain_map_db(np.eye(4))
    probe = geometry.probe
    line = probe.num_lines // 2
    depth_of_sample = probe.ranges_mm() + y_a  # image Y of each sample on the central line
    surface = np.searchsorted(depth_of_sample, 25.0)
    just_above, just_below, deep = gain[surface - 3, line], gain[surface + 1, line], gain[surface + 20, line]
    assert just_above - just_below < 3.0  # within 0.2 mm of the surface: at most the TGC/muscle slope
    assert just_above - deep > 30.0  # 3 mm into bone: the shadow


def test_specular_echo_falls_with_the_angle_between_beam_and_normal():
    # A sheet of scatterers at 20 mm depth whose normal is tilted by psi from the beam: the echo power
    # scales by exp(-psi^2 / psi0^2) (the weight exp(-psi^2 / 2 psi0^2) squared).
    probe = CurvilinearProbe(fov_deg=10.0, num_lines=32, num_samples=300)
    geometry = ImageGeometry(probe, 120, 160, SMALL_PIXEL_MM)
    x_a, y_a = geometry.apex_mm
    rng = np.random.default_rng(4)
    count = 20000
    positions = np.column_stack([x_a + rng.uniform(-8, 8, count), np.full(count, y_a + 60.0),
                                 rng.uniform(-6, 6, count)])
    amplitudes = rng.standard_normal(count) + 1j * rng.standard_normal(count)
    powers = []
    psi0 = math.radians(RenderSettings().specular_psi0_deg)
    for psi in (0.0, math.radians(10), math.radians(20)):
        # the normal lies in the image plane's depth / elevation directions, so in-plane beam angles keep psi
        normals = np.tile([0.0, math.cos(psi), math.sin(psi)], (count, 1))
        renderer = Renderer(geometry, bin_scatterers(positions, amplitudes, normals, 2.0))
        powers.append(np.mean(np.abs(renderer.iq(np.eye(4))[:, 12:20]) ** 2))  # central lines: beam ~ depth axis
    assert powers[1] / powers[0] == pytest.approx(math.exp(-math.radians(10) ** 2 / psi0**2), rel=0.02)
    assert powers[2] / powers[0] == pytest.approx(math.exp(-math.radians(20) ** 2 / psi0**2), rel=0.02)


def test_bad_inputs_are_refused(small_scene):
    geometry, scatterers = small_scene
    renderer = Renderer(geometry, scatterers)
    with pytest.raises(ValueError, match="4x4"):
        renderer.render(np.eye(3), noise_seed=0)
    with pytest.raises(ValueError, match="slab_sigmas"):
        RenderSettings(slab_sigmas=0.0)


def test_skin_entry_echo_is_a_band_under_the_face_only_where_tissue_touches_it(small_scene):
    geometry, scatterers = small_scene
    probe = geometry.probe
    plain = Renderer(geometry, scatterers).iq(np.eye(4))
    with_entry = Renderer(geometry, scatterers, settings=RenderSettings(entry_echo_db=8.0)).iq(np.eye(4))
    band = int(round(RenderSettings().entry_echo_mm / probe.sample_spacing_mm))
    added = np.abs(with_entry - plain)
    assert added[:band].mean() > 1.0  # +8 dB over 0 dB speckle at the face
    np.testing.assert_array_equal(with_entry[band:], plain[band:])  # nothing deeper than the band
    # where the face touches nothing (tissue only from 20 mm deep), there is no entry echo
    x_a, y_a = geometry.apex_mm
    deep = uniform_block([0.0, y_a + probe.radius_mm + 20, -7.0], [geometry.width * SMALL_PIXEL_MM[0], 100.0, 7.0],
                         10.0, echo_db=-6.0)
    deep_plain = Renderer(geometry, deep).iq(np.eye(4))
    deep_entry = Renderer(geometry, deep, settings=RenderSettings(entry_echo_db=8.0)).iq(np.eye(4))
    np.testing.assert_array_equal(deep_entry, deep_plain)


def test_mirrored_tissue_seen_from_the_mirrored_pose_gives_the_same_frame(small_scene):
    """The simulator's images cannot tell a scan from its mirror twin (README, "Direction cues").

    Reflecting the tissue through a plane and the pose with it (its elevational axis reversed, so the
    image frame stays right-handed) gives the same frame: the lateral and axial point spread and the
    elevational beam profile are symmetric, and envelope detection keeps no phase. A twin's out-of-plane
    motion is reversed, its in-plane motion unchanged, so no image-only method can tell the two apart.
    """
    geometry, _ = small_scene
    width_mm = geometry.width * SMALL_PIXEL_MM[0]
    rng = np.random.default_rng(5)
    count = 120_000
    positions = np.array([-10.0, 0.0, -7.0]) + rng.random((count, 3)) * np.array([width_mm + 20, 100.0, 11.0])
    amplitudes = (rng.standard_normal(count) + 1j * rng.standard_normal(count)) * 0.5
    bright = (np.abs(positions[:, 2] - 2.0) < 1.0) & (positions[:, 1] > 40)  # a sheet off the image plane
    amplitudes[bright] *= 8.0
    normals = np.zeros((count, 3))
    mirror = np.diag([1.0, 1.0, -1.0, 1.0])  # tissue reflected through Z = 0 (any plane would do)
    flip_elevation = np.diag([1.0, 1.0, -1.0, 1.0])  # the image frame's z (elevational) axis reversed
    tissue = Renderer(geometry, bin_scatterers(positions, amplitudes, normals), uniform_medium(geometry))
    twin = Renderer(geometry, bin_scatterers(positions * [1, 1, -1], amplitudes, normals), uniform_medium(geometry))

    # a pose tilted out of plane and twisted, so that the elevational profile samples both sides unevenly
    c, s = math.cos(math.radians(12.0)), math.sin(math.radians(12.0))
    pose = np.array([[c, 0.0, s, 2.0], [0.0, 1.0, 0.0, 1.5], [-s, 0.0, c, 0.8], [0.0, 0.0, 0.0, 1.0]])
    tilt = math.radians(6.0)
    pose = pose @ np.array([[1.0, 0.0, 0.0, 0.0], [0.0, math.cos(tilt), -math.sin(tilt), 0.0],
                            [0.0, math.sin(tilt), math.cos(tilt), 0.0], [0.0, 0.0, 0.0, 1.0]])
    twin_pose = mirror @ pose @ flip_elevation
    assert np.linalg.det(twin_pose[:3, :3]) == pytest.approx(1.0)

    original, mirrored = tissue.iq(pose), twin.iq(twin_pose)
    scale = np.abs(original).max()
    np.testing.assert_allclose(mirrored, original, atol=1e-4 * scale)
    np.testing.assert_array_equal(twin.render(twin_pose, noise_seed=3), tissue.render(pose, noise_seed=3))
    # ... and the twin seen from the unmirrored pose is another frame (the test can fail)
    other = twin.iq(pose)
    assert np.abs(other - original).max() > 0.3 * scale
