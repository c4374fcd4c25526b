"""Probe geometry and beam widths against the numbers of SIMULATOR.md."""

import numpy as np
import pytest

from simulation.probe import FWHM_TO_SIGMA, CurvilinearProbe, ImageGeometry

REAL_PIXEL_MM = (0.229389190673828, 0.220979690551758)


def test_beam_widths_match_the_design_note():
    probe = CurvilinearProbe()
    # lateral FWHM 0.886 lambda F#: 0.46 mm to 40 mm depth, 1.02 mm at 90 mm
    np.testing.assert_allclose(probe.sigma_lateral_mm([20, 40, 90]) / FWHM_TO_SIGMA, [0.455, 0.455, 1.023], atol=0.005)
    # elevational FWHM: 1.0 mm at the 45 mm focus, 3.2 mm at 17 mm, 5.1 mm at 90 mm
    np.testing.assert_allclose(probe.sigma_elevation_mm([45, 17, 90]) / FWHM_TO_SIGMA, [1.02, 3.27, 5.10], atol=0.01)
    assert probe.sigma_axial_mm() == pytest.approx(0.30 / 2.3548, rel=1e-4)
    assert probe.sample_spacing_mm == pytest.approx(0.15, rel=0.01)


def test_sector_sits_where_the_real_frames_have_it():
    geometry = ImageGeometry(CurvilinearProbe(), 480, 640, REAL_PIXEL_MM)
    np.testing.assert_allclose(geometry.apex_mm, (73.52, -32.93), atol=0.01)
    mask = geometry.sector_mask()
    rows = np.flatnonzero(mask.any(axis=1)) + 1
    columns = np.flatnonzero(mask.any(axis=0)) + 1
    assert abs(rows[0] - 3) <= 1 and abs(rows[-1] - 439) <= 1
    assert abs(columns[0] - 12) <= 1 and abs(columns[-1] - 629) <= 1
    assert mask[:, 319].sum() == mask[:, 320].sum()  # symmetric about the centre column 320.5


def test_probe_to_image_is_a_rotation_mapping_the_apex():
    geometry = ImageGeometry(CurvilinearProbe(), 480, 640, REAL_PIXEL_MM)
    tform = geometry.tform_probe_to_image_mm()
    np.testing.assert_allclose(tform[:3, :3] @ tform[:3, :3].T, np.eye(3), atol=1e-15)
    assert np.linalg.det(tform[:3, :3]) == pytest.approx(1.0)
    # the skin contact point (0, 0, R) in the probe frame is the centre column, contact depth down
    contact = tform @ np.array([0.0, 0.0, 40.0, 1.0])
    np.testing.assert_allclose(contact[:2], [320.5 * REAL_PIXEL_MM[0], 32 * REAL_PIXEL_MM[1]], atol=1e-9)


def test_scan_conversion_table_covers_exactly_the_sector():
    geometry = ImageGeometry(CurvilinearProbe(num_lines=64, num_samples=150), 120, 160, (0.9175, 0.8839))
    pixels, sample, line, w_sample, w_line = geometry.scan_conversion_table()
    np.testing.assert_array_equal(pixels, np.flatnonzero(geometry.sector_mask()))
    assert sample.min() >= 0 and sample.max() <= 148 and line.min() >= 0 and line.max() <= 62
    assert (w_sample >= 0).all() and (w_sample <= 1).all() and (w_line >= 0).all() and (w_line <= 1).all()
    # the table reproduces each pixel's range: r = R + (sample + w) dr
    r, _ = geometry.pixel_polar()
    probe = geometry.probe
    np.testing.assert_allclose(probe.radius_mm + (sample + w_sample) * probe.sample_spacing_mm, r.ravel()[pixels],
                               atol=1e-4)


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="num_lines=1"):
        CurvilinearProbe(num_lines=1)
    with pytest.raises(ValueError, match="image 1x640"):
        ImageGeometry(CurvilinearProbe(), 1, 640, REAL_PIXEL_MM)
