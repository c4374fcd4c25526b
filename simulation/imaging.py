"""Image formation: tissue-fixed point scatterers -> one B-mode frame of the curvilinear probe.

The model is SIMULATOR.md's "Image formation" (baseband IQ on the (r, theta) beam grid):

    IQ(r_i, th_j) = sum_s a_s A_s exp(-i 2 k r_s) g_ax(r_i - r_s) g_lat(r_s (th_j - th_s); z_s) g_el(y_s; z_s)

Per frame (:meth:`Renderer.render`):

1. the 2 mm scatterer bins whose cube can meet the slab ``|y_p| < slab_sigmas sigma_el(depth)`` inside
   the sector are found by walking the slab's bounding box in bin space (compiled, no Python loop);
2. one fused compiled loop over their scatterers: tissue -> probe frame, range checks, elevational
   weight (per-depth table), specular weight, phase ``exp(-i 2 k r)`` and a bilinear splat into the
   complex beam grid, which keeps each scatterer's sub-sample position (in-plane shifts and
   interference depend on it);
3. axial Gaussian along r, then a depth-dependent lateral Gaussian across lines;
4. gain map: TGC minus the two-way attenuation integrated along each line through the medium (coarse
   polar grid, interpolated), plus a global gain;
5. complex noise, envelope, log compression over the dynamic range and bilinear scan conversion
   (exactly 0 outside the sector).

Noise is added after the TGC / attenuation map, at a fixed level on screen (``noise_db`` against
0 dB speckle, before the global gain). SIMULATOR.md lists it before the gain map; there the TGC
(+76 dB at 9 cm) lifts it to mid grey wherever the beam meets no attenuating tissue (beside and below
the arm), which real frames show black.

Calibration: the PSF is normalised so that speckle from a 0 dB tissue at ``reference_density_per_mm3``
has mean intensity E|IQ|^2 = 1 at every depth (before the gain map), whatever the beam widths there;
a peak-normalised PSF would brighten diffuse tissue 10 dB from the focus to 9 cm as the beam widens
(so there is no focal-zone brightening either). Noise power and gain are quoted against that reference.

Frames: poses are ``T_tissue<-image`` (image mm, DESIGN.md section 2); the probe frame is
``geometry.tform_probe_to_image_mm()`` away (simulation/probe.py). Everything is deterministic for a
(pose, noise seed): the compiled loops are single-threaded and visit scatterers in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from scipy import ndimage

from simulation.probe import ImageGeometry
from simulation.tissue import Medium, Scatterers

_PHASE_TABLE_SIZE = 4096  # linear interpolation error of cos/sin ~ (2 pi / 4096)^2 / 8 = 3e-7
_DEPTH_TABLE_STEP_MM = 0.05  # sigma_el changes by < 0.003 mm over one step


@dataclass(frozen=True)
class RenderSettings:
    """Image formation knobs; defaults are SIMULATOR.md's numbers.

    Frequency, wavelength (c = 1540 m/s) and the PSF widths belong to the probe
    (:class:`simulation.probe.CurvilinearProbe`), so they are not repeated here.
    """

    gain_db: float = -45.0  # muscle (-6 dB echo) near the face -> mean grey ~ 90
    dynamic_range_db: float = 83.0
    tgc_db_cm_mhz: float = 0.7  # compensates a one-way 0.7 dB/cm/MHz, applied two-way
    noise_db: float = -55.0  # complex noise power on screen against 0 dB speckle at the reference density
    specular_psi0_deg: float = 12.0  # specular echo ~ exp(-psi^2 / 2 psi0^2)
    reference_density_per_mm3: float = 10.0  # density at which a 0 dB tissue has E|IQ|^2 = 1
    slab_sigmas: float = 2.5  # elevational cut: g_el = exp(-2.5^2 / 2) = 0.044 there
    attenuation_step_mm: float = 1.0  # coarse polar grid for the attenuation integral
    attenuation_line_stride: int = 4
    # An interface echoes before the wave enters what lies behind it: the loss at depth r counts the
    # medium only up to r - this. Without it the bone surface (then a 0.5 mm shell with 12-24 dB/mm of
    # two-way bone loss behind it, smeared by the 1 mm grid) came out darker than the muscle above.
    interface_loss_delay_mm: float = 1.0
    # Skin entry echo (dB against 0 dB speckle; None: off): the probe is pressed 0-3 mm into a rigid
    # phantom, so the skin itself lies above the face, yet real frames show the compressed skin / gel
    # interface as a bright line under the face wherever it touches the arm. Added to the IQ as a
    # fixed speckled band, ``entry_echo_mm`` deep, on lines with tissue at the face. Off by default
    # (the physics tests use bare tissue blocks); simulation.dataset turns it on.
    entry_echo_db: float | None = None
    entry_echo_mm: float = 1.0

    def __post_init__(self):
        if self.dynamic_range_db <= 0 or self.specular_psi0_deg <= 0 or self.reference_density_per_mm3 <= 0:
            raise ValueError(f"dynamic_range_db, specular_psi0_deg and reference_density_per_mm3 must be > 0: {self}")
        if self.interface_loss_delay_mm < 0:
            raise ValueError(f"interface_loss_delay_mm must be >= 0: {self}")
        if self.slab_sigmas <= 0 or self.attenuation_step_mm <= 0 or self.attenuation_line_stride < 1:
            raise ValueError(f"slab_sigmas, attenuation_step_mm > 0 and attenuation_line_stride >= 1 expected: {self}")


# ---- compiled kernels ---------------------------------------------------------------------------


@numba.njit(cache=True, fastmath=True)
def _atan_small(t):
    """atan(t) for |t| <= tan(22.5 deg) = 0.414: odd Taylor series to t^11 (error < 1e-6 rad there,
    < 1e-8 rad for the |t| <= 0.3 of a 66 degree sector); libm's atan2 costs ~4x more per scatterer."""
    t2 = t * t
    return t * (1.0 + t2 * (-1.0 / 3 + t2 * (1.0 / 5 + t2 * (-1.0 / 7 + t2 * (1.0 / 9 + t2 * (-1.0 / 11 + t2 / 13))))))


@numba.njit(cache=True, fastmath=True)
def _splat_slab(positions, amplitudes, normals, bin_start, bin_specular, bin_origin, bin_size, bin_shape,
                bin_lo, bin_hi, rot, trans, radius, num_samples, sample_spacing, num_lines, half_fov, line_spacing,
                depth_lo, depth_step, ycut2, ycut_bin, el_coef, el_norm,
                two_over_lambda, cos_table, sin_table, specular_coef, out_re, out_im):
    """Select the bins near the slab and splat their scatterers into ``out_re/out_im`` [S, L] (added to).

    ``rot``/``trans``: tissue -> probe frame. ``bin_specular[b]``: bin b holds a scatterer with a normal.
    Depth tables are indexed by
    ``round((depth - depth_lo) / depth_step)``; ``ycut_bin`` already includes the bin's reach in depth.
    Returns the number of scatterers splatted.
    """
    half_diag = 0.5 * math.sqrt(3.0) * bin_size
    r_min = radius - half_diag
    r_max = radius + (num_samples - 1) * sample_spacing + half_diag
    sin_half = math.sin(half_fov)
    tan_reach = math.tan(min(half_fov + 2.0 * line_spacing, 0.25 * math.pi))  # also keeps |x| <= z
    ny = bin_shape[1]
    nz = bin_shape[2]
    ntab = ycut2.shape[0]
    nphase = cos_table.shape[0] - 1
    used = 0
    for bi in range(bin_lo[0], bin_hi[0]):
        cx = bin_origin[0] + (bi + 0.5) * bin_size
        for bj in range(bin_lo[1], bin_hi[1]):
            cy = bin_origin[1] + (bj + 0.5) * bin_size
            for bk in range(bin_lo[2], bin_hi[2]):
                flat = (bi * ny + bj) * nz + bk
                first = bin_start[flat]
                last = bin_start[flat + 1]
                if first == last:
                    continue
                # conservative test of the bin's cube (radius half_diag around its centre)
                cz = bin_origin[2] + (bk + 0.5) * bin_size
                bx = rot[0, 0] * cx + rot[0, 1] * cy + rot[0, 2] * cz + trans[0]
                by = rot[1, 0] * cx + rot[1, 1] * cy + rot[1, 2] * cz + trans[1]
                bz = rot[2, 0] * cx + rot[2, 1] * cy + rot[2, 2] * cz + trans[2]
                br = math.sqrt(bx * bx + bz * bz)
                if br < r_min or br > r_max:
                    continue
                # distance from the sector's edge ray: |x| cos(half) - z sin(half) (for |theta| > half)
                if abs(bx) * math.cos(half_fov) - bz * sin_half > half_diag:
                    continue
                ti = int((br - radius - depth_lo) / depth_step + 0.5)
                ti = min(max(ti, 0), ntab - 1)
                if abs(by) > ycut_bin[ti]:
                    continue
                # the largest |y_p| the slab allows anywhere in this bin: most rejections stop here
                ycut_here = ycut_bin[ti] - half_diag
                specular = bin_specular[flat]
                for s in range(first, last):
                    px = np.float64(positions[s, 0])
                    py = np.float64(positions[s, 1])
                    pz = np.float64(positions[s, 2])
                    y = rot[1, 0] * px + rot[1, 1] * py + rot[1, 2] * pz + trans[1]
                    if abs(y) > ycut_here:
                        continue
                    x = rot[0, 0] * px + rot[0, 1] * py + rot[0, 2] * pz + trans[0]
                    z = rot[2, 0] * px + rot[2, 1] * py + rot[2, 2] * pz + trans[2]
                    if z <= 0.0 or abs(x) > z * tan_reach:
                        continue
                    r = math.sqrt(x * x + z * z)
                    fs = (r - radius) / sample_spacing
                    if fs < 0.0 or fs > num_samples - 1:
                        continue
                    ti = int((r - radius - depth_lo) / depth_step + 0.5)
                    y2 = y * y
                    if y2 > ycut2[ti]:
                        continue
                    # theta = atan2(x, z) = 2 atan(tan(theta / 2)), tan(theta / 2) = x / (r + z)
                    theta = 2.0 * _atan_small(x / (r + z))
                    fl = (theta + half_fov) / line_spacing
                    if fl < 0.0 or fl > num_lines - 1:
                        continue
                    weight = math.exp(y2 * el_coef[ti]) * el_norm[ti]
                    nx = 0.0
                    nyy = 0.0
                    nzz = 0.0
                    if specular:  # most bins have none: skip reading 12 bytes per scatterer
                        nx = normals[s, 0]
                        nyy = normals[s, 1]
                        nzz = normals[s, 2]
                    norm2 = nx * nx + nyy * nyy + nzz * nzz
                    if norm2 > 0.0:
                        # specular: psi between the beam (in-plane line through the scatterer) and the
                        # normal; |cos| because either side of an interface reflects alike
                        npx = rot[0, 0] * nx + rot[0, 1] * nyy + rot[0, 2] * nzz
                        npz = rot[2, 0] * nx + rot[2, 1] * nyy + rot[2, 2] * nzz
                        cos_psi = min(abs(npx * x + npz * z) / (r * math.sqrt(norm2)), 1.0)
                        psi = math.acos(cos_psi)
                        weight *= math.exp(-psi * psi * specular_coef)
                    # exp(-i 2 k r): 2 k r / (2 pi) = 2 r / lambda cycles; table + linear interpolation
                    cycles = r * two_over_lambda
                    frac = (cycles - math.floor(cycles)) * nphase
                    k = min(int(frac), nphase - 1)
                    u = frac - k
                    c = cos_table[k] + u * (cos_table[k + 1] - cos_table[k])
                    sn = sin_table[k] + u * (sin_table[k + 1] - sin_table[k])
                    ar = np.float64(amplitudes[s].real)
                    ai = np.float64(amplitudes[s].imag)
                    vr = weight * (ar * c + ai * sn)  # (ar + i ai)(c - i sn)
                    vi = weight * (ai * c - ar * sn)
                    i0 = int(fs)
                    if i0 > num_samples - 2:
                        i0 = num_samples - 2
                    wi = fs - i0
                    j0 = int(fl)
                    if j0 > num_lines - 2:
                        j0 = num_lines - 2
                    wj = fl - j0
                    w00 = (1.0 - wi) * (1.0 - wj)
                    w01 = (1.0 - wi) * wj
                    w10 = wi * (1.0 - wj)
                    w11 = wi * wj
                    out_re[i0, j0] += w00 * vr
                    out_im[i0, j0] += w00 * vi
                    out_re[i0, j0 + 1] += w01 * vr
                    out_im[i0, j0 + 1] += w01 * vi
                    out_re[i0 + 1, j0] += w10 * vr
                    out_im[i0 + 1, j0] += w10 * vi
                    out_re[i0 + 1, j0 + 1] += w11 * vr
                    out_im[i0 + 1, j0 + 1] += w11 * vi
                    used += 1
    return used


@numba.njit(cache=True, fastmath=True)
def _filter_psf(in_re, in_im, axial_kernel, lateral_kernels, out_re, out_im):
    """Axial Gaussian along samples (one kernel), then lateral across lines (one kernel per sample row);
    zero outside the grid. ``lateral_kernels``: [S, 2b + 1]."""
    num_samples, num_lines = in_re.shape
    half_a = axial_kernel.shape[0] // 2
    half_b = lateral_kernels.shape[1] // 2
    tmp_re = np.zeros(num_lines, dtype=np.float32)
    tmp_im = np.zeros(num_lines, dtype=np.float32)
    for i in range(num_samples):
        tmp_re[:] = 0.0
        tmp_im[:] = 0.0
        for a in range(-half_a, half_a + 1):
            src = i + a
            if src < 0 or src >= num_samples:
                continue
            w = axial_kernel[a + half_a]
            for j in range(num_lines):
                tmp_re[j] += w * in_re[src, j]
                tmp_im[j] += w * in_im[src, j]
        for j in range(num_lines):
            out_re[i, j] = 0.0
            out_im[i, j] = 0.0
        for b in range(-half_b, half_b + 1):
            w = lateral_kernels[i, b + half_b]
            j_lo = max(0, -b)
            j_hi = min(num_lines, num_lines - b)
            for j in range(j_lo, j_hi):
                out_re[i, j] += w * tmp_re[j + b]
                out_im[i, j] += w * tmp_im[j + b]


@numba.njit(cache=True, fastmath=True)
def _compress_and_convert(iq_re, iq_im, gain_map_db, global_gain_db, noise_re, noise_im, dynamic_range,
                          pixels, sample, line, w_sample, w_line, out):
    """Gain map (without the global gain) on the IQ, add the noise, log-compress
    (20 log10 |.| + global gain over ``dynamic_range`` dB to 0..255), then bilinear scan conversion
    into ``out`` (flat uint8, already zero outside the sector)."""
    num_samples, num_lines = iq_re.shape
    grey = np.empty((num_samples, num_lines), dtype=np.float32)
    scale = 255.0 / dynamic_range
    to_amplitude = math.log(10.0) / 20.0
    for i in range(num_samples):
        for j in range(num_lines):
            a = math.exp((gain_map_db[i, j] - global_gain_db) * to_amplitude)
            re = iq_re[i, j] * a + noise_re[i, j]
            im = iq_im[i, j] * a + noise_im[i, j]
            power = max(re * re + im * im, 1e-30)
            level = (10.0 * math.log10(power) + global_gain_db + dynamic_range) * scale
            grey[i, j] = min(max(level, 0.0), 255.0)
    for p in range(pixels.shape[0]):
        i = sample[p]
        j = line[p]
        ws = w_sample[p]
        wl = w_line[p]
        value = ((1.0 - ws) * ((1.0 - wl) * grey[i, j] + wl * grey[i, j + 1])
                 + ws * ((1.0 - wl) * grey[i + 1, j] + wl * grey[i + 1, j + 1]))
        out[pixels[p]] = np.uint8(min(value + 0.5, 255.0))


# ---- the renderer -------------------------------------------------------------------------------


def _sampled_gaussian(sigma_mm: float, spacing_mm: float) -> np.ndarray:
    """Gaussian kernel on the grid whose convolution with the bilinear splat has variance sigma^2.

    A bilinear splat spreads a point as a unit triangle (variance spacing^2 / 6); subtracting it keeps
    the effective PSF width right although the grid barely resolves it (axial sigma 0.13 mm vs
    dr = 0.15 mm). Peak 1; the calibration is done separately."""
    sigma = math.sqrt(max(sigma_mm**2 - spacing_mm**2 / 6.0, (0.25 * spacing_mm) ** 2)) / spacing_mm
    half = max(1, int(math.ceil(3.0 * sigma)))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    return np.exp(-(offsets**2) / (2.0 * sigma**2))


def _splat_energy(kernel: np.ndarray, spacing_mm: float) -> float:
    """mm: integral over a scatterer's position of the squared response at one grid point (splat then
    ``kernel``), i.e. the PSF's ``integral g^2`` as the grid actually realises it."""
    u = (np.arange(64) + 0.5) / 64  # fractional positions between two samples
    padded = np.concatenate([[0.0], kernel, [0.0]])
    response = (1.0 - u[:, None]) * padded[None, 1:] + u[:, None] * padded[None, :-1]
    return float((response**2).sum(axis=1).mean() * spacing_mm)


class Renderer:
    """Renders B-mode frames of one phantom; build once per worker (tables and arrays are reused).

    Args:
        geometry: image size, pixel size and the probe (beam grid, PSF widths).
        scatterers: the phantom's binned scatterers, tissue frame mm.
        medium: attenuation volume (dB/cm/MHz, tissue frame); ``None`` means no attenuation.
        settings: :class:`RenderSettings`.
    """

    def __init__(self, geometry: ImageGeometry, scatterers: Scatterers, medium: Medium | None = None,
                 settings: RenderSettings | None = None):
        settings = RenderSettings() if settings is None else settings
        self.geometry = geometry
        self.settings = settings
        probe = geometry.probe
        self.probe = probe
        self._check_scatterers(scatterers)
        self.scatterers = scatterers
        self._positions = np.ascontiguousarray(scatterers.positions, dtype=np.float32)
        self._amplitudes = np.ascontiguousarray(scatterers.amplitudes, dtype=np.complex64)
        self._normals = np.ascontiguousarray(scatterers.normals, dtype=np.float32)
        self._bin_start = np.ascontiguousarray(scatterers.bin_start, dtype=np.int64)
        self._bin_origin = np.asarray(scatterers.bin_origin, dtype=np.float64).reshape(3)
        self._bin_shape = np.asarray(scatterers.bin_shape, dtype=np.int64).reshape(3)
        has_normal = np.concatenate([[0], np.cumsum(np.any(self._normals != 0, axis=1), dtype=np.int64)])
        self._bin_specular = (has_normal[self._bin_start[1:]] > has_normal[self._bin_start[:-1]]).astype(np.uint8)
        del has_normal
        self.medium = medium
        if medium is not None and np.asarray(medium.attenuation).ndim != 3:
            raise ValueError(f"medium.attenuation must be [nx, ny, nz], got shape {np.shape(medium.attenuation)}")

        num_samples, num_lines = probe.num_samples, probe.num_lines
        ranges = probe.ranges_mm()
        depths = ranges - probe.radius_mm
        bin_size = float(scatterers.bin_size)
        half_diag = 0.5 * math.sqrt(3.0) * bin_size

        # -- PSF, calibrated so that E|IQ|^2 = (density / reference) 10^(echo_dB / 10) at every depth
        self._axial_kernel = _sampled_gaussian(probe.sigma_axial_mm(), probe.sample_spacing_mm)
        axial_energy = _splat_energy(self._axial_kernel, probe.sample_spacing_mm)
        self._axial_kernel = (self._axial_kernel / math.sqrt(axial_energy)).astype(np.float32)
        arcs = ranges * probe.line_spacing_rad  # mm between lines at each sample's range
        rows = [_sampled_gaussian(float(s), float(a)) for s, a in zip(probe.sigma_lateral_mm(depths), arcs)]
        half_b = max(len(row) // 2 for row in rows)
        self._lateral_kernels = np.zeros((num_samples, 2 * half_b + 1), dtype=np.float32)
        for i, (row, arc) in enumerate(zip(rows, arcs)):
            h = len(row) // 2
            self._lateral_kernels[i, half_b - h:half_b + h + 1] = row / math.sqrt(_splat_energy(row, float(arc)))

        # -- per-depth elevational tables (depth of the scatterer below the face, padded for bins)
        self._depth_lo = -half_diag - 1.0
        table_depths = np.arange(self._depth_lo, probe.depth_mm + half_diag + 1.0 + _DEPTH_TABLE_STEP_MM,
                                 _DEPTH_TABLE_STEP_MM)
        sigma_el = probe.sigma_elevation_mm(np.maximum(table_depths, 0.0))
        ycut = settings.slab_sigmas * sigma_el
        self._ycut2 = ycut**2
        self._el_coef = -1.0 / (2.0 * sigma_el**2)
        # integral g_el^2 dy = sqrt(pi) sigma_el; the reference density folds in here too
        self._el_norm = 1.0 / np.sqrt(np.sqrt(np.pi) * sigma_el * settings.reference_density_per_mm3)
        reach = int(math.ceil(half_diag / _DEPTH_TABLE_STEP_MM))
        padded = np.pad(ycut, reach, mode="edge")
        window = np.lib.stride_tricks.sliding_window_view(padded, 2 * reach + 1)
        self._ycut_bin = window.max(axis=1) + half_diag
        self._ycut_max = float(ycut.max())
        self._half_diag = half_diag

        angles = np.linspace(0.0, 2.0 * np.pi, _PHASE_TABLE_SIZE + 1)
        self._cos_table = np.cos(angles)
        self._sin_table = np.sin(angles)
        self._two_over_lambda = 2.0 / probe.wavelength_mm
        self._specular_coef = 1.0 / (2.0 * math.radians(settings.specular_psi0_deg) ** 2)

        # -- gain map pieces: TGC by depth, coarse polar grid for the attenuation integral
        self._tgc_db = (2.0 * settings.tgc_db_cm_mhz * probe.frequency_mhz * depths / 10.0).astype(np.float32)
        coarse_lines = np.arange(0, num_lines, settings.attenuation_line_stride)
        if coarse_lines[-1] != num_lines - 1:
            coarse_lines = np.append(coarse_lines, num_lines - 1)
        num_steps = int(math.ceil(probe.depth_mm / settings.attenuation_step_mm))
        step = probe.depth_mm / num_steps
        mid_ranges = probe.radius_mm + (np.arange(num_steps) + 0.5) * step
        coarse_angles = probe.angles_rad()[coarse_lines]
        # probe-frame midpoints [num_steps, num_coarse, 3] of each coarse step
        self._att_points = np.stack([np.outer(mid_ranges, np.sin(coarse_angles)),
                                     np.zeros((num_steps, coarse_lines.size)),
                                     np.outer(mid_ranges, np.cos(coarse_angles))], axis=-1).reshape(-1, 3)
        self._att_shape = (num_steps, coarse_lines.size)
        self._att_step = step
        position = depths / step  # sample i -> coarse node position (node k at depth k * step)
        self._att_row = np.minimum(np.floor(position).astype(np.int64), num_steps - 1)
        self._att_row_w = (position - self._att_row)[:, None].astype(np.float32)
        line_position = np.interp(np.arange(num_lines), coarse_lines, np.arange(coarse_lines.size))
        self._att_col = np.minimum(np.floor(line_position).astype(np.int64), coarse_lines.size - 2)
        self._att_col_w = (line_position - self._att_col)[None, :].astype(np.float32)

        self._scan_table = geometry.scan_conversion_table()
        noise_std = math.sqrt(10.0 ** (settings.noise_db / 10.0) / 2.0)  # per real / imaginary part
        rows = max(1, int(round(settings.entry_echo_mm / probe.sample_spacing_mm)))
        rng = np.random.default_rng(1)
        taper = np.exp(-0.5 * (np.arange(rows) / (0.5 * rows)) ** 2)[:, None]  # fades with depth
        pattern = (rng.standard_normal((rows, num_lines)) + 1j * rng.standard_normal((rows, num_lines))) * taper
        self._entry = None if settings.entry_echo_db is None else \
            (pattern * 10.0 ** (settings.entry_echo_db / 20.0) / math.sqrt(2.0)).astype(np.complex64)
        self._contact_rows = max(2, int(round(1.5 / probe.sample_spacing_mm)))
        pool_size = 4 * 2 * num_samples * num_lines  # 6 x num_samples x num_lines distinct windows
        self._noise_pool = np.random.default_rng(0).standard_normal(pool_size, dtype=np.float32) * np.float32(noise_std)

    @staticmethod
    def _check_scatterers(scatterers: Scatterers) -> None:
        count = len(scatterers)
        if np.shape(scatterers.positions) != (count, 3) or np.shape(scatterers.normals) != (count, 3):
            raise ValueError(f"scatterer positions {np.shape(scatterers.positions)} and normals "
                             f"{np.shape(scatterers.normals)} must both be [{count}, 3]")
        if np.shape(scatterers.amplitudes) != (count,):
            raise ValueError(f"scatterer amplitudes {np.shape(scatterers.amplitudes)} must be [{count}]")
        num_bins = int(np.prod(scatterers.bin_shape))
        if np.shape(scatterers.bin_start) != (num_bins + 1,) or int(scatterers.bin_start[-1]) != count:
            raise ValueError(f"bin_start {np.shape(scatterers.bin_start)} must be [{num_bins + 1}] ending at {count}")
        if not scatterers.bin_size > 0:
            raise ValueError(f"bin_size={scatterers.bin_size} mm must be positive")

    # ---- poses ----------------------------------------------------------------------------------

    def _tissue_to_probe(self, tform_tissue_from_image) -> np.ndarray:
        tform = np.asarray(tform_tissue_from_image, dtype=np.float64)
        if tform.shape != (4, 4) or not np.all(np.isfinite(tform)):
            raise ValueError(f"tform_tissue_from_image must be a finite 4x4 matrix, got shape {tform.shape}")
        tform_tissue_from_probe = tform @ self.geometry.tform_probe_to_image_mm()
        rotation = tform_tissue_from_probe[:3, :3]
        inverse = np.eye(4)
        inverse[:3, :3] = rotation.T
        inverse[:3, 3] = -rotation.T @ tform_tissue_from_probe[:3, 3]
        return inverse

    def _bin_box(self, tform_tissue_from_probe: np.ndarray):
        """Bin index range [lo, hi) covering the slab's bounding box (probe frame box -> tissue)."""
        probe = self.probe
        far = probe.radius_mm + probe.depth_mm
        x_half = far * math.sin(probe.half_fov_rad)
        y_half = self._ycut_max + self._half_diag
        corners = np.array([[x, y, z, 1.0] for x in (-x_half, x_half) for y in (-y_half, y_half)
                            for z in (probe.radius_mm * math.cos(probe.half_fov_rad), far)])
        tissue = (tform_tissue_from_probe @ corners.T)[:3].T
        size = self.scatterers.bin_size
        lo = np.floor((tissue.min(axis=0) - size - self._bin_origin) / size).astype(np.int64)
        hi = np.floor((tissue.max(axis=0) + size - self._bin_origin) / size).astype(np.int64) + 1
        return np.clip(lo, 0, self._bin_shape), np.clip(hi, 0, self._bin_shape)

    # ---- the chain --------------------------------------------------------------------------------

    def iq(self, tform_tissue_from_image) -> np.ndarray:
        """complex64 [num_samples, num_lines]: filtered baseband IQ on the beam grid, before the gain map
        and without noise; E|IQ|^2 = (density / reference density) 10^(echo_dB / 10) in speckle."""
        re, im = self._signal(tform_tissue_from_image)
        iq = np.empty(re.shape, dtype=np.complex64)
        iq.real = re
        iq.imag = im
        return iq

    def _signal(self, tform_tissue_from_image):
        probe = self.probe
        tissue_to_probe = self._tissue_to_probe(tform_tissue_from_image)
        lo, hi = self._bin_box(np.linalg.inv(tissue_to_probe))
        shape = (probe.num_samples, probe.num_lines)
        splat_re = np.zeros(shape, dtype=np.float32)
        splat_im = np.zeros(shape, dtype=np.float32)
        _splat_slab(self._positions, self._amplitudes, self._normals, self._bin_start, self._bin_specular,
                    self._bin_origin, float(self.scatterers.bin_size), self._bin_shape, lo, hi,
                    np.ascontiguousarray(tissue_to_probe[:3, :3]), np.ascontiguousarray(tissue_to_probe[:3, 3]),
                    probe.radius_mm, probe.num_samples, probe.sample_spacing_mm, probe.num_lines,
                    probe.half_fov_rad, probe.line_spacing_rad, self._depth_lo, _DEPTH_TABLE_STEP_MM,
                    self._ycut2, self._ycut_bin, self._el_coef, self._el_norm,
                    self._two_over_lambda, self._cos_table, self._sin_table, self._specular_coef,
                    splat_re, splat_im)
        re = np.empty(shape, dtype=np.float32)
        im = np.empty(shape, dtype=np.float32)
        _filter_psf(splat_re, splat_im, self._axial_kernel, self._lateral_kernels, re, im)
        if self._entry is not None:
            # contact: tissue echo in the first 1.5 mm (fat at -24 dB gives ~4e-3; air gaps ~0)
            top = slice(0, self._contact_rows)
            contact = np.mean(re[top] ** 2 + im[top] ** 2, axis=0) > 1e-4
            rows = self._entry.shape[0]
            re[:rows, contact] += self._entry.real[:, contact]
            im[:rows, contact] += self._entry.imag[:, contact]
        return re, im

    def _noise(self, noise_seed: int):
        """(real, imaginary) float32 [num_samples, num_lines] noise for a seed: a window of a fixed white
        pool at a seed-chosen offset (drawing 2 x 150k normals per frame cost ~3 ms, 10 % of a frame)."""
        shape = (self.probe.num_samples, self.probe.num_lines)
        size = shape[0] * shape[1]
        start = int(np.random.default_rng(noise_seed).integers(0, self._noise_pool.size - 2 * size + 1))
        return (self._noise_pool[start:start + size].reshape(shape),
                self._noise_pool[start + size:start + 2 * size].reshape(shape))

    def envelope(self, tform_tissue_from_image, noise_seed: int | None = None) -> np.ndarray:
        """float32 [num_samples, num_lines]: the envelope on the beam grid, before the gain map.

        Without ``noise_seed`` this is ``|IQ|``; with one, the frame's noise is referred back through
        the gain map (``|IQ + n / A|``, A the map's amplitude gain), so that ``20 log10(envelope) +
        gain_map_db`` is exactly what :meth:`render` compresses."""
        re, im = self._signal(tform_tissue_from_image)
        if noise_seed is not None:
            noise_re, noise_im = self._noise(noise_seed)
            # float64: behind bone the map falls by hundreds of dB and 1 / A would overflow float32
            relative = self.gain_map_db(tform_tissue_from_image).astype(np.float64) - self.settings.gain_db
            inverse = np.power(10.0, -relative / 20.0)
            re = re + noise_re * inverse
            im = im + noise_im * inverse
        return np.sqrt(re * re + im * im).astype(np.float32)

    def gain_map_db(self, tform_tissue_from_image) -> np.ndarray:
        """float32 [num_samples, num_lines], dB: TGC - two-way attenuation along each line + global gain."""
        settings = self.settings
        gain = self._tgc_db + np.float32(settings.gain_db)
        if self.medium is None:
            return np.repeat(gain[:, None], self.probe.num_lines, axis=1)
        tissue_from_probe = np.linalg.inv(self._tissue_to_probe(tform_tissue_from_image))
        points = self._att_points @ tissue_from_probe[:3, :3].T + tissue_from_probe[:3, 3]
        medium = self.medium
        voxel = (points - np.asarray(medium.origin, dtype=np.float64).reshape(1, 3)) / float(medium.spacing)
        alpha = ndimage.map_coordinates(np.asarray(medium.attenuation, dtype=np.float32), voxel.T, order=1,
                                        mode="constant", cval=0.0).reshape(self._att_shape)
        # one-way dB / MHz accumulated from the face: node k sits at depth k * step
        loss = np.zeros((self._att_shape[0] + 1, self._att_shape[1]), dtype=np.float32)
        np.cumsum(alpha * np.float32(self._att_step / 10.0), axis=0, out=loss[1:])
        delay = int(round(self.settings.interface_loss_delay_mm / self._att_step))
        if delay:  # the loss reaching depth r is the medium's in front of r - delay
            loss[delay:] = loss[:-delay].copy()
            loss[:delay] = 0.0
        loss_rows = loss[self._att_row] * (1 - self._att_row_w) + loss[self._att_row + 1] * self._att_row_w
        loss_grid = (loss_rows[:, self._att_col] * (1 - self._att_col_w)
                     + loss_rows[:, self._att_col + 1] * self._att_col_w)
        return gain[:, None] - np.float32(2.0 * self.probe.frequency_mhz) * loss_grid

    def render(self, tform_tissue_from_image, noise_seed: int) -> np.ndarray:
        """uint8 [H, W] B-mode frame for the image-plane pose ``T_tissue<-image`` (4x4, mm); exactly 0
        outside the sector. Deterministic for (pose, noise_seed)."""
        re, im = self._signal(tform_tissue_from_image)
        gain = self.gain_map_db(tform_tissue_from_image)
        noise_re, noise_im = self._noise(noise_seed)
        out = np.zeros(self.geometry.height * self.geometry.width, dtype=np.uint8)
        pixels, sample, line, w_sample, w_line = self._scan_table
        _compress_and_convert(re, im, gain, float(self.settings.gain_db), noise_re, noise_im,
                              float(self.settings.dynamic_range_db), pixels, sample, line, w_sample, w_line, out)
        return out.reshape(self.geometry.height, self.geometry.width)
