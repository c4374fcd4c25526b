"""Dense displacement fields (DDFs) of ultrasound frames under rigid transforms, in bounded memory.

The TUS-REC challenge scores a reconstruction by the displacement of every pixel (and of landmark
pixels) between where a frame lies under the predicted transforms and where it lies under the
tracked ones. This module produces those fields from transforms:

- ``cal_global_ddfs`` / ``cal_local_ddfs``: the challenge functions, same signatures and outputs
  (float32 numpy ``(DDF [N-1, 3, H*W], landmark_DDF [3, K])``), computed frame chunk by frame chunk
  straight into the output, so the peak memory is the output itself plus a few MB;
- ``write_ddfs``: the four fields of a scan (``GP``, ``GL``, ``LP``, ``LL``) streamed to an HDF5
  file or a directory of ``.npy`` files in constant memory whatever the number of frames.

Why it is cheap: a transform's field over the pixel grid is affine in the pixel coordinates. For a
homogeneous pixel ``p = [x, y, 0, 1]`` (x = column from 1, y = row from 1, DESIGN.md section 2),

    DDF(p) = (T S p - S p)[0:3] = ((T - I) S)[0:3] p = a x + b y + c,

with three 3-vectors ``a, b, c`` per frame (columns 0, 1 and 3 of ``((T - I) S)[0:3]``). The
coefficients are formed in float64 and the field is evaluated in float32 as ``(b y + c) + a x``, a
broadcast of an [n, 3, H, 1] column term and an [n, 3, 1, W] row term written into the output; the
official ``T @ (S @ points)`` then subtract needs a [N-1, 4, H*W] intermediate and a second full
array. Landmark fields are evaluated with the very same float32 operations at the landmark pixels,
so ``GL[:, l]`` equals ``GP[f-1, :, (y-1)*W + x-1]`` bit for bit without reading the big array.

Conventions (``utils/transform.py``): ``S`` = ``tform_calib_scale`` maps image pixels to image mm;
``T_{0<-i}`` (global) and ``T_{i-1<-i}`` (local) map frame i's image mm into frame 0's (resp.
frame i-1's) image mm. Fields are in mm, expressed in the destination frame's image mm axes.
Landmarks are int [K, 3] rows ``(frame index from 0, x from 1, y from 1)``; frame 0 has no field
row (it is the reference), so a landmark on it is an error here (the official code would silently
read the last frame).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np
import torch

from utils.atomic import atomic_folder, atomic_path
from utils.landmarks import check_landmarks
from utils.transform import reference_image_points

# Memory for one chunk of float32 fields (device staging buffer, streaming buffer): small enough to
# be invisible next to a scan's output (2.9 GB for 800 frames of 480x640), large enough that the
# per-chunk overhead (a few small tensor ops) is negligible.
DEFAULT_CHUNK_BYTES = 32 * 2**20

FIELD_NAMES = ("GP", "GL", "LP", "LL")


# --------------------------------------------------------------------------------------------
# The challenge functions
# --------------------------------------------------------------------------------------------


def cal_global_ddfs(transformation_global, tform_calib_scale, image_points, landmark, w=640, h=480, *,
                    chunk_frames=None):
    """Global DDFs of a scan: every pixel's and every landmark's displacement under ``T_{0<-i}``.

    Args:
        transformation_global: [N-1, 4, 4] float tensor, ``T_{0<-i}`` for frames i = 1..N-1 (image
            mm of frame i -> image mm of frame 0). Its device is where the field is evaluated.
        tform_calib_scale: [4, 4] ``S``, image pixel -> image mm (diagonal).
        image_points: [4, h*w] homogeneous pixels; the official full grid
            ``reference_image_points([h, w], [h, w])`` (x = column 1..w, y = row 1..h, row-major over
            (y, x)) takes the fast path, any other point set is transformed as given.
        landmark: int [K, 3] (numpy or tensor), rows ``(frame from 0, x from 1, y from 1)``, frame in
            1..N-1.
        w, h: image width (columns) and height (rows) in pixels.
        chunk_frames: frames evaluated per chunk; default from ``DEFAULT_CHUNK_BYTES``.
    Returns:
        ``(GP, GL)``: float32 numpy [N-1, 3, h*w] and [3, K], displacements ``(T S p - S p)[0:3]`` in
        mm, in frame 0's image mm axes. ``GL[:, l] == GP[f-1, :, (y-1)*w + x-1]``.
    Raises:
        ValueError: on a wrong shape, a non-float transform, or a landmark outside frames 1..N-1,
        x outside 1..w or y outside 1..h.
    """
    return _cal_ddfs(transformation_global, tform_calib_scale, image_points, landmark, w, h, chunk_frames,
                     "transformation_global")


def cal_local_ddfs(transformation_local, tform_calib_scale, image_points, landmark, w=640, h=480, *,
                   chunk_frames=None):
    """Local DDFs of a scan: as ``cal_global_ddfs`` with ``T_{i-1<-i}`` for frames i = 1..N-1.

    Returns ``(LP, LL)``: float32 numpy [N-1, 3, h*w] and [3, K] in mm, frame i's field expressed in
    frame i-1's image mm axes. See ``cal_global_ddfs`` for the arguments.
    """
    return _cal_ddfs(transformation_local, tform_calib_scale, image_points, landmark, w, h, chunk_frames,
                     "transformation_local")


def _cal_ddfs(transforms, tform_calib_scale, image_points, landmark, w, h, chunk_frames, name):
    width, height = _check_size(w, h)
    coeffs = field_coefficients(transforms, tform_calib_scale, name=name)
    device = torch.as_tensor(transforms).device
    points = _check_image_points(image_points, width, height)
    landmarks = check_landmarks(landmark, coeffs.shape[0] + 1, height, width)
    num_points = width * height
    chunk = _chunk_frames(chunk_frames, num_points)

    fields = np.empty((coeffs.shape[0], 3, num_points), dtype=np.float32)
    evaluator = _Evaluator(coeffs, points, width, height, device, chunk)
    for start in range(0, coeffs.shape[0], chunk):
        stop = min(start + chunk, coeffs.shape[0])
        evaluator.fill(start, stop, fields[start:stop])
    return fields, evaluator.landmark_fields(landmarks)


# --------------------------------------------------------------------------------------------
# Streaming to disk
# --------------------------------------------------------------------------------------------


def write_ddfs(path, transformation_global, transformation_local, tform_calib_scale, landmark=None, w=640, h=480,
               *, fmt="h5", chunk_frames=None, compression=None):
    """Write a scan's four DDFs to disk in constant memory, whatever the number of frames.

    Args:
        path: destination: an HDF5 file (``fmt="h5"``) or a directory (``fmt="npy"``). It appears
            only once complete (written under a temporary name, then renamed); on any error nothing
            is left at ``path`` (a previous result there is kept).
        transformation_global: [N-1, 4, 4] ``T_{0<-i}`` (image mm), or None to skip GP/GL.
        transformation_local: [N-1, 4, 4] ``T_{i-1<-i}`` (image mm), or None to skip LP/LL.
        tform_calib_scale: [4, 4] ``S``, image pixel -> image mm.
        landmark: int [K, 3] ``(frame from 0, x from 1, y from 1)`` or None (then no GL/LL).
        w, h: image width and height in pixels; fields cover the full grid
            ``reference_image_points([h, w], [h, w])``.
        fmt: ``"h5"``: one file with datasets ``GP``, ``GL``, ``LP``, ``LL``, fields chunked one frame
            per HDF5 chunk; ``"npy"``: a directory with ``GP.npy``, ``GL.npy``, ``LP.npy``, ``LL.npy``.
        chunk_frames: frames computed and written per step (the memory bound); default from
            ``DEFAULT_CHUNK_BYTES``.
        compression: HDF5 filter for the pixel fields (e.g. ``"gzip"``, ``"lzf"``); none by default,
            since float fields compress poorly and it costs time.
    Writes float32 ``GP``/``LP`` [N-1, 3, h*w] and ``GL``/``LL`` [3, K], in mm, exactly the arrays
    ``cal_global_ddfs`` / ``cal_local_ddfs`` return.
    Returns:
        ``Path`` of what was written.
    """
    if fmt not in ("h5", "npy"):
        raise ValueError(f"fmt={fmt!r} is not one of ['h5', 'npy']")
    if fmt == "npy" and compression is not None:
        raise ValueError(f"compression={compression!r} needs fmt='h5'; .npy files are not compressed")
    width, height = _check_size(w, h)
    num_points = width * height
    chunk = _chunk_frames(chunk_frames, num_points)
    sources = {"G": transformation_global, "L": transformation_local}
    evaluators = {}
    for prefix, transforms in sources.items():
        if transforms is None:
            continue
        name = "transformation_global" if prefix == "G" else "transformation_local"
        coeffs = field_coefficients(transforms, tform_calib_scale, name=name)
        device = torch.as_tensor(transforms).device
        evaluators[prefix] = _Evaluator(coeffs, None, width, height, device, chunk)
    if not evaluators:
        raise ValueError("transformation_global and transformation_local are both None: nothing to write")
    counts = {prefix: ev.num_frames for prefix, ev in evaluators.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"global and local transforms differ in frame count: {counts}; expected both N-1")
    num_frames = next(iter(counts.values()))
    landmarks = None if landmark is None else check_landmarks(landmark, num_frames + 1, height, width)

    # The one large buffer: a chunk of fields, reused for every chunk of every field.
    buffer = np.empty((min(chunk, max(num_frames, 1)), 3, num_points), dtype=np.float32)
    path = Path(path)
    if fmt == "h5":
        with atomic_path(path) as tmp:
            _write_h5(tmp, evaluators, landmarks, buffer, num_frames, num_points, compression)
    else:
        with _atomic_directory(path) as tmp:
            _write_npy(tmp, evaluators, landmarks, buffer, num_frames, num_points)
    return path


def _stream_chunks(evaluator, buffer, num_frames):
    """Yield ``(start, stop, fields)`` with fields [stop-start, 3, P] float32 views of ``buffer``."""
    step = buffer.shape[0]
    for start in range(0, num_frames, step):
        stop = min(start + step, num_frames)
        view = buffer[: stop - start]
        evaluator.fill(start, stop, view)
        yield start, stop, view


def _write_h5(tmp, evaluators, landmarks, buffer, num_frames, num_points, compression):
    from utils.hdf5_writing import writing_hdf5  # only the streaming writer needs h5py

    field_bytes = len(evaluators) * num_frames * 3 * num_points * 4
    with writing_hdf5(tmp, reserve=field_bytes) as file:
        for prefix, evaluator in evaluators.items():
            # One frame per HDF5 chunk: a reader of one frame touches one chunk, and chunks (3.7 MB
            # at 480x640) exceed the 1 MB chunk cache, so writes go straight to the file.
            chunks = (1, 3, num_points) if num_frames > 0 else None
            dataset = file.create_dataset(f"{prefix}P", shape=(num_frames, 3, num_points), dtype=np.float32,
                                          chunks=chunks, compression=compression)
            for start, stop, fields in _stream_chunks(evaluator, buffer, num_frames):
                dataset[start:stop] = fields
            if landmarks is not None:
                file.create_dataset(f"{prefix}L", data=evaluator.landmark_fields(landmarks))


def _write_npy(tmp, evaluators, landmarks, buffer, num_frames, num_points):
    for prefix, evaluator in evaluators.items():
        # The header, then the raw C-order data appended chunk by chunk: the layout ``open_memmap``
        # writes, without mapping the file, whose written pages would count in this process's
        # resident memory and grow with N.
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (num_frames, 3, num_points)}
        with open(tmp / f"{prefix}P.npy", "wb") as file:
            np.lib.format.write_array_header_1_0(file, header)  # a 3-int shape fits format 1.0
            for _, _, fields in _stream_chunks(evaluator, buffer, num_frames):
                file.write(fields.data)
        if landmarks is not None:
            np.save(tmp / f"{prefix}L.npy", evaluator.landmark_fields(landmarks))


@contextlib.contextmanager
def _atomic_directory(path):
    """Yield a temporary directory beside ``path``; on success it replaces ``path``, else it is removed.

    The temporary is locked while written (``utils.atomic``), so a later writer of ``path`` removes it
    only if this process died.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; fmt='npy' writes a directory there")
    with atomic_folder(path) as tmp:
        yield tmp


# --------------------------------------------------------------------------------------------
# Field evaluation
# --------------------------------------------------------------------------------------------


def field_coefficients(transforms, tform_calib_scale, name="transforms") -> torch.Tensor:
    """Affine coefficients of the fields: ``((T - I) S)[:, 0:3, :]``, [M, 3, 4] float64 on the CPU.

    For a homogeneous pixel ``p`` (pixels), ``coeffs[i] @ p`` is frame i's displacement in mm,
    ``(T_i S p - S p)[0:3]``. Exact for any 4x4 (rigid or not): only rows 0..2 of ``T`` enter.
    ``transforms`` is [M, 4, 4] (image mm -> image mm), ``tform_calib_scale`` [4, 4].
    """
    tforms = torch.as_tensor(transforms)
    if tforms.ndim != 3 or tuple(tforms.shape[1:]) != (4, 4):
        raise ValueError(f"{name} has shape {tuple(tforms.shape)}; expected [N-1, 4, 4]")
    if not tforms.is_floating_point():
        raise ValueError(f"{name} has dtype {tforms.dtype}; expected a float tensor")
    scale = torch.as_tensor(tform_calib_scale)
    if tuple(scale.shape) != (4, 4):
        raise ValueError(f"tform_calib_scale has shape {tuple(scale.shape)}; expected [4, 4]")
    # float64 on the CPU: the coefficients are tiny, and T - I cancels most of T's magnitude, so
    # forming them in float32 would lose the digits the float32 evaluation then relies on.
    tforms = tforms.detach().to("cpu", torch.float64)
    scale = scale.detach().to("cpu", torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    return ((tforms - eye) @ scale)[:, 0:3, :].contiguous()


class _Evaluator:
    """Evaluates the fields of frames [start, stop) of one set of transforms into float32 arrays.

    ``points`` None means the official full grid (affine fast path); otherwise a [4, P] tensor.
    """

    def __init__(self, coeffs, points, width, height, device, chunk):
        self.num_frames = coeffs.shape[0]
        self.width, self.height = width, height
        self.device = torch.device(device)
        # The one float32 rounding of the coefficients, shared by pixel and landmark evaluation so
        # that both give bit-identical values.
        self.coeffs32 = coeffs.to(torch.float32)
        self.coeffs64 = coeffs
        self.points = points
        self._device_coeffs = self.coeffs32.to(self.device)
        if points is None:
            self._xs = torch.arange(1, width + 1, dtype=torch.float32, device=self.device)
            self._ys = torch.arange(1, height + 1, dtype=torch.float32, device=self.device)[:, None]
        else:
            self._points32 = points.to(self.device, torch.float32)
        # Off the CPU the fields are computed in a device buffer, then copied into the numpy output.
        self._staging = None
        if self.device.type != "cpu":
            num_points = width * height if points is None else points.shape[1]
            self._staging = torch.empty((min(chunk, max(self.num_frames, 1)), 3, num_points),
                                        dtype=torch.float32, device=self.device)

    def fill(self, start, stop, out):
        """Write the fields of frames start..stop-1 into ``out``, float32 numpy [stop-start, 3, P]."""
        count = stop - start
        coeffs = self._device_coeffs[start:stop]
        target = torch.from_numpy(out) if self._staging is None else self._staging[:count]
        if self.points is None:
            grid = target.view(count, 3, self.height, self.width)
            # a x + (b y + c): one broadcast add of a row term [n, 3, 1, W] and a column term
            # [n, 3, H, 1] written straight into the output, no [n, 3, H, W] temporary.
            row = coeffs[:, :, 0, None, None] * self._xs
            column = coeffs[:, :, 1, None, None] * self._ys
            column += coeffs[:, :, 3, None, None]
            torch.add(column, row, out=grid)
        else:
            torch.mm(coeffs.reshape(count * 3, 4), self._points32, out=target.view(count * 3, -1))
        if self._staging is not None:
            torch.from_numpy(out).copy_(target)  # device -> host; a sync point

    def landmark_fields(self, landmarks):
        """[3, K] float32 numpy fields at landmarks [K, 3] (already validated) without the pixel fields."""
        frames = torch.as_tensor(landmarks[:, 0] - 1, dtype=torch.long)
        if self.points is None:
            coeffs = self.coeffs32[frames]  # [K, 3, 4]
            xs = torch.as_tensor(landmarks[:, 1], dtype=torch.float32)[:, None]
            ys = torch.as_tensor(landmarks[:, 2], dtype=torch.float32)[:, None]
            # Exactly the operations of ``fill``, so GL equals GP at the landmark pixel bit for bit.
            row = coeffs[:, :, 0] * xs
            column = coeffs[:, :, 1] * ys
            column += coeffs[:, :, 3]
            values = column + row
        else:
            index = torch.as_tensor((landmarks[:, 2] - 1) * self.width + landmarks[:, 1] - 1, dtype=torch.long)
            points = self.points.to("cpu", torch.float64)[:, index]  # [4, K]
            values = torch.einsum("kij,jk->ki", self.coeffs64[frames], points).to(torch.float32)
        return np.ascontiguousarray(values.T.numpy())


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_size(w, h):
    if int(w) != w or int(h) != h or int(w) < 1 or int(h) < 1:
        raise ValueError(f"image size w={w!r}, h={h!r}; expected positive integers (columns, rows)")
    return int(w), int(h)


def _chunk_frames(chunk_frames, num_points):
    if chunk_frames is None:
        return max(1, DEFAULT_CHUNK_BYTES // (3 * num_points * 4))
    if int(chunk_frames) != chunk_frames or int(chunk_frames) < 1:
        raise ValueError(f"chunk_frames={chunk_frames!r}; expected a positive integer")
    return int(chunk_frames)


@functools.lru_cache(maxsize=8)
def _official_grid(height, width, dtype, device):
    return reference_image_points([height, width], [height, width]).to(device=device, dtype=dtype)


def _check_image_points(image_points, width, height):
    """None when ``image_points`` is the official full grid, else the points as a tensor [4, P]."""
    points = torch.as_tensor(image_points)
    if tuple(points.shape) != (4, width * height):
        raise ValueError(
            f"image_points has shape {tuple(points.shape)}; expected [4, h*w] = [4, {width * height}] "
            f"for w={width}, h={height}"
        )
    if not points.is_floating_point():
        points = points.to(torch.float32)
    points = points.detach()
    if torch.equal(points, _official_grid(height, width, points.dtype, points.device)):
        return None
    return points
