"""Geometry and beam of the simulated curvilinear probe (a 4DC7-3/40-like transducer, SIMULATOR.md).

Frames
------
- Probe frame (mm): origin at the centre of curvature of the convex face (the apex), ``x`` lateral,
  ``y`` elevational, ``z`` along the central beam (into the tissue). A point has range
  ``r = sqrt(x^2 + z^2)`` and angle ``theta = atan2(x, z)``; its depth below the face is ``r - R``.
- Image mm (DESIGN.md section 2): ``X`` = column direction, ``Y`` = row direction (depth), ``Z``
  out of the image plane, origin at pixel (0, 0) so that pixel (x, y) (1-based) sits at
  ``(x * s_x, y * s_y)`` = ``S @ [x, y, 0, 1]``.
- ``X = X_a + x_p, Y = Y_a + z_p, Z = -y_p`` (a proper rotation): the apex lies at
  ``(X_a, Y_a) = ((W + 1) / 2 * s_x, contact_depth - R)``, i.e. the skin contact point is the
  centre column, ``contact_depth`` mm below the image top (row 32 at 480x640).

The beam grid on which echoes are formed is ``num_samples`` ranges from ``R`` to ``R + depth``
times ``num_lines`` angles from ``-fov/2`` to ``+fov/2``, both inclusive and uniform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))  # sigma = FWHM / 2.3548


@dataclass(frozen=True)
class CurvilinearProbe:
    """Transducer and beam-grid parameters; the defaults are SIMULATOR.md's numbers."""

    radius_mm: float = 40.0  # R, from the probe's name (4DC7-3/40)
    fov_deg: float = 66.0  # sector opening
    depth_mm: float = 90.0  # imaging depth below the face (the challenge's 9 cm)
    num_lines: int = 256
    num_samples: int = 600  # dr = 0.15 mm
    frequency_mhz: float = 6.0
    sound_speed_m_s: float = 1540.0
    axial_fwhm_mm: float = 0.30
    elevation_aperture_mm: float = 10.0  # h
    elevation_focus_mm: float = 45.0  # z_f, depth below the face
    elevation_beta: float = 0.5  # how fast the elevational beam widens away from the focus
    contact_depth_mm: float = 32 * 0.220979690551758  # skin contact: row 32 of the real 480x640 frames

    def __post_init__(self):
        if min(self.radius_mm, self.fov_deg, self.depth_mm, self.frequency_mhz) <= 0:
            raise ValueError(f"probe dimensions must be positive: {self}")
        if self.num_lines < 2 or self.num_samples < 2:
            raise ValueError(f"num_lines={self.num_lines} and num_samples={self.num_samples} must be >= 2")

    # ---- beam grid ------------------------------------------------------------------------

    @property
    def wavelength_mm(self) -> float:
        return self.sound_speed_m_s / (self.frequency_mhz * 1e6) * 1e3

    @property
    def half_fov_rad(self) -> float:
        return math.radians(self.fov_deg) / 2

    @property
    def sample_spacing_mm(self) -> float:
        return self.depth_mm / (self.num_samples - 1)

    @property
    def line_spacing_rad(self) -> float:
        return 2 * self.half_fov_rad / (self.num_lines - 1)

    def ranges_mm(self) -> np.ndarray:
        """[num_samples] ranges r of the beam grid, from R to R + depth."""
        return self.radius_mm + self.sample_spacing_mm * np.arange(self.num_samples)

    def angles_rad(self) -> np.ndarray:
        """[num_lines] beam angles theta, from -fov/2 to +fov/2."""
        return -self.half_fov_rad + self.line_spacing_rad * np.arange(self.num_lines)

    # ---- point spread function (two-way, Gaussian; FWHM -> sigma) ---------------------------

    def sigma_axial_mm(self) -> float:
        return self.axial_fwhm_mm * FWHM_TO_SIGMA

    def sigma_lateral_mm(self, depth_mm):
        """Lateral sigma at ``depth_mm`` below the face: FWHM = 0.886 lambda F#, F# = max(2, z / 20 mm)."""
        f_number = np.maximum(2.0, np.asarray(depth_mm, dtype=np.float64) / 20.0)
        return 0.886 * self.wavelength_mm * f_number * FWHM_TO_SIGMA

    def sigma_elevation_mm(self, depth_mm):
        """Elevational sigma: FWHM = sqrt(F0^2 + (beta h (z - z_f) / z_f)^2), F0 = 0.886 lambda z_f / h."""
        z = np.asarray(depth_mm, dtype=np.float64)
        focal = 0.886 * self.wavelength_mm * self.elevation_focus_mm / self.elevation_aperture_mm
        spread = self.elevation_beta * self.elevation_aperture_mm * (z - self.elevation_focus_mm) / self.elevation_focus_mm
        return np.sqrt(focal**2 + spread**2) * FWHM_TO_SIGMA


@dataclass(frozen=True)
class ImageGeometry:
    """Where the probe's sector lies in an H x W frame with pixel size (s_x, s_y) mm."""

    probe: CurvilinearProbe
    height: int
    width: int
    pixel_mm: tuple  # (s_x, s_y): the calibration's scaling_from_pixel_to_mm diagonal

    def __post_init__(self):
        if self.height < 2 or self.width < 2 or min(self.pixel_mm) <= 0:
            raise ValueError(f"image {self.height}x{self.width} with pixel size {self.pixel_mm} mm is not valid")

    @property
    def apex_mm(self) -> tuple:
        """(X_a, Y_a): the probe frame's origin in image mm."""
        return ((self.width + 1) / 2 * self.pixel_mm[0], self.probe.contact_depth_mm - self.probe.radius_mm)

    def tform_probe_to_image_mm(self) -> np.ndarray:
        """4x4 float64: probe frame -> image mm (``X = X_a + x_p, Y = Y_a + z_p, Z = -y_p``)."""
        x_a, y_a = self.apex_mm
        return np.array([[1.0, 0, 0, x_a], [0, 0, 1.0, y_a], [0, -1.0, 0, 0], [0, 0, 0, 1.0]])

    def pixel_polar(self):
        """(r, theta) [H, W] float64 of every pixel centre (1-based pixels, rows y, columns x)."""
        x_a, y_a = self.apex_mm
        xs = np.arange(1, self.width + 1) * self.pixel_mm[0] - x_a
        zs = np.arange(1, self.height + 1) * self.pixel_mm[1] - y_a
        lateral, axial = np.meshgrid(xs, zs)
        return np.hypot(lateral, axial), np.arctan2(lateral, axial)

    def sector_mask(self) -> np.ndarray:
        """bool [H, W]: pixels inside the sector (R <= r <= R + depth, |theta| <= fov / 2)."""
        r, theta = self.pixel_polar()
        probe = self.probe
        return (r >= probe.radius_mm) & (r <= probe.radius_mm + probe.depth_mm) & (np.abs(theta) <= probe.half_fov_rad)

    def scan_conversion_table(self):
        """Bilinear look-up from the beam grid to the frame.

        Returns ``(flat_pixels, sample_index, line_index, w_sample, w_line)``: for every pixel inside
        the sector (flattened row-major index), the lower grid corner (int32, clipped so the upper
        corner exists) and the fractional weights (float32) towards the upper corner. Pixels outside
        the sector are not listed: they stay exactly 0.
        """
        r, theta = self.pixel_polar()
        inside = self.sector_mask()
        probe = self.probe
        sample = (r[inside] - probe.radius_mm) / probe.sample_spacing_mm
        line = (theta[inside] + probe.half_fov_rad) / probe.line_spacing_rad
        sample_index = np.clip(np.floor(sample), 0, probe.num_samples - 2).astype(np.int32)
        line_index = np.clip(np.floor(line), 0, probe.num_lines - 2).astype(np.int32)
        return (
            np.flatnonzero(inside).astype(np.int64),
            sample_index,
            line_index,
            (sample - sample_index).astype(np.float32),
            (line - line_index).astype(np.float32),
        )
