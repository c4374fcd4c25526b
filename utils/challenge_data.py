"""Reading and writing scans in the TUS-REC challenge's on-disk layouts (DESIGN.md section 3).

Two layouts, both accepted by every reader:

- train (``frames_transfs``)::

      <root>/frames_transfs/<NNN>/<scan>.h5   'frames' uint8 [N, H, W] and 'tforms' float [N, 4, 4]
      <root>/landmarks/landmark_<NNN>.h5      one int [K, 3] dataset per scan name
      <root>/calib_matrix.csv

- validation / test (``dataset_keys.h5``)::

      <root>/frames/<NNN>/<scan>.h5           'frames'
      <root>/transfs/<NNN>/<scan>.h5          'tforms'
      <root>/landmarks/landmark_<NNN>.h5      (the 2024 test set names the folder ``landmark``)
      <root>/calib_matrix.csv
      <root>/dataset_keys.h5                  one entry per scan, named ``sub<NNN>__<scan>``

``frames[i]`` is image i (row y, column x); ``tforms[i]`` maps tracker tool -> camera for frame i
(mm). Landmarks are rows ``(frame from 0, x from 1, y from 1)``. Landmark files may be absent (the
real PLUS scans have none). Every reader validates what it reads at this boundary and raises
``FileNotFoundError`` / ``ValueError`` naming the file, the dataset and the bad value, so nothing
downstream sees a half-valid scan. The writers produce the same files with the challenge's dtypes
(frames uint8, tforms float32, landmarks int64); the simulator and the tests use them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from utils.atomic import atomic_path
from utils.errors import InputError
from utils.hdf5_writing import writing_hdf5
from utils.landmarks import check_landmarks

LAYOUT_TRAIN = "train"
LAYOUT_TEST = "test"
LAYOUTS = (LAYOUT_TRAIN, LAYOUT_TEST)

FRAMES_KEY = "frames"
TFORMS_KEY = "tforms"
TRAIN_FOLDER = "frames_transfs"
FRAMES_FOLDER = "frames"
TFORMS_FOLDER = "transfs"
LANDMARK_FOLDERS = ("landmarks", "landmark")  # the 2024 test set uses the singular
DATASET_KEYS_FILE = "dataset_keys.h5"
CALIB_FILE = "calib_matrix.csv"

# Largest accepted max |R^T R - I| of a tracker pose's rotation. Tracker poses are stored as float32
# (eps 6e-8); products of a few such matrices drift by ~1e-6, the real PLUS poses by 2e-6. 1e-3
# still refuses a scaled or sheared matrix, or a pose stored transposed with its translation.
POSE_ORTHONORMAL_TOLERANCE = 1e-3
# Largest accepted |last row - [0, 0, 0, 1]| entry: the challenge writes exact zeros and one, a
# float32 product of poses may leave rounding noise.
POSE_LAST_ROW_TOLERANCE = 1e-6

_KEY_PATTERN = re.compile(r"^sub(\d+)__(.+)$")


def subject_folder(subject: int) -> str:
    """The folder name of a subject id: three digits, zero-padded (``7 -> "007"``)."""
    return f"{int(subject):03d}"


def dataset_key(subject_folder_name: str, scan_name: str) -> str:
    """The ``dataset_keys.h5`` key of a scan: ``sub<NNN>__<scan>``."""
    return f"sub{subject_folder_name}__{scan_name}"


def landmark_file_name(subject: int) -> str:
    """``landmark_<NNN>.h5`` (the official code formats the subject id with ``%03d``)."""
    return f"landmark_{int(subject):03d}.h5"


def open_hdf5(path, name: str, expected: str) -> h5py.File:
    """Open ``path`` for reading; a missing, truncated or non-HDF5 file raises with the file's name.

    h5py's own OSError names neither the file nor what was expected of it ("file signature not
    found"). Raises FileNotFoundError ``"<name> not found: <path>"`` or InputError (unreadable;
    ``expected`` says what the file should hold, e.g. "'frames' uint8 [N, H, W]").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise InputError(f"{path}: not a readable HDF5 file ({_h5_reason(error)}, {os.path.getsize(path)} bytes); "
                         f"expected a {name}: HDF5 with {expected}") from None


def _h5_reason(error: OSError) -> str:
    # h5py: "Unable to synchronously open file (truncated file: eof = 5000, ...)": keep the parenthesis.
    text = str(error)
    return text[text.find("(") + 1 : text.rfind(")")] if "(" in text and text.endswith(")") else text


@dataclass(frozen=True)
class ScanRef:
    """Where one scan's files are. In the train layout ``frames_path == tforms_path``.

    Attributes:
        subject: subject id (the folder name as an int).
        subject_folder: the folder name itself, e.g. ``"000"``.
        name: scan name, the file name without ``.h5`` (e.g. ``"LH_rotation"``).
        frames_path: HDF5 file holding ``'frames'``.
        tforms_path: HDF5 file holding ``'tforms'``.
        landmark_path: the subject's ``landmark_<NNN>.h5``, or None where the dataset has none.
        key: ``sub<NNN>__<scan>``, as in ``dataset_keys.h5``.
    """

    subject: int
    subject_folder: str
    name: str
    frames_path: Path
    tforms_path: Path
    landmark_path: Path | None
    key: str


@dataclass(eq=False)  # eq would compare arrays elementwise
class Scan:
    """One scan in memory.

    Attributes:
        frames: uint8 numpy [N, H, W] (row y, column x).
        tforms: numpy [N, 4, 4] as stored (float32 or float64), tracker tool -> camera, mm.
        landmarks: int64 numpy [K, 3] (frame from 0 but always in 1..N-1, x from 1, y from 1), or None
            where the dataset has no landmark file.
    """

    name: str
    subject: int
    key: str
    frames: np.ndarray
    tforms: np.ndarray
    landmarks: np.ndarray | None

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(H, W)`` in pixels."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def detect_layout(root) -> str:
    """``"train"`` (``frames_transfs/`` present) or ``"test"`` (``dataset_keys.h5`` present).

    Raises FileNotFoundError naming the root and both markers if neither is there, ValueError if
    both are (the scans to read would be ambiguous).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    has_train = (root / TRAIN_FOLDER).is_dir()
    has_test = (root / DATASET_KEYS_FILE).is_file()
    if has_train and has_test:
        raise InputError(
            f"{root}: holds both {TRAIN_FOLDER}/ (train layout) and {DATASET_KEYS_FILE} "
            f"(validation/test layout); keep one layout per dataset root"
        )
    if has_train:
        return LAYOUT_TRAIN
    if has_test:
        return LAYOUT_TEST
    raise FileNotFoundError(
        f"{root}: not a TUS-REC dataset root: found neither {TRAIN_FOLDER}/ (train layout) "
        f"nor {DATASET_KEYS_FILE} (validation/test layout)"
    )


def landmark_path(root, subject: int) -> Path | None:
    """The subject's landmark file under ``landmarks/`` or ``landmark/``, or None if neither exists."""
    for folder in LANDMARK_FOLDERS:
        path = Path(root) / folder / landmark_file_name(subject)
        if path.is_file():
            return path
    return None


def _visible(path: Path) -> bool:
    # Hidden entries include atomic_path's temporaries (".<name>.partial.h5") of a writer in flight.
    return not path.name.startswith(".")


def _find_train_scans(root: Path) -> list[ScanRef]:
    refs = []
    for folder in (root / TRAIN_FOLDER).iterdir():
        if not folder.is_dir() or not _visible(folder):
            continue
        if not folder.name.isdigit():
            raise InputError(
                f"{folder}: subject folders under {TRAIN_FOLDER}/ must be numeric (e.g. '000'), "
                f"got {folder.name!r}"
            )
        subject = int(folder.name)
        landmarks = landmark_path(root, subject)
        for path in folder.glob("*.h5"):
            if _visible(path) and path.is_file():
                refs.append(
                    ScanRef(subject, folder.name, path.stem, path, path, landmarks, dataset_key(folder.name, path.stem))
                )
    return refs


def read_dataset_keys(path) -> list[str]:
    """The keys of a ``dataset_keys.h5`` (``sub<NNN>__<scan>``), sorted; FileNotFoundError if absent."""
    with open_hdf5(path, "dataset keys file", "one entry per scan, named sub<NNN>__<scan>") as handle:
        return sorted(handle.keys())


def _find_test_scans(root: Path) -> list[ScanRef]:
    keys_path = root / DATASET_KEYS_FILE
    refs = []
    for key in read_dataset_keys(keys_path):
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise InputError(f"{keys_path}: key {key!r} is not of the form 'sub<NNN>__<scan>'")
        folder, name = match.group(1), match.group(2)
        frames_path = root / FRAMES_FOLDER / folder / f"{name}.h5"
        tforms_path = root / TFORMS_FOLDER / folder / f"{name}.h5"
        for path in (frames_path, tforms_path):
            if not path.is_file():
                raise FileNotFoundError(f"{keys_path}: scan {key!r} is listed but its file {path} does not exist")
        refs.append(ScanRef(int(folder), folder, name, frames_path, tforms_path, landmark_path(root, int(folder)), key))
    return refs


def find_scans(root) -> list[ScanRef]:
    """Every scan of a dataset root in either layout, sorted by (subject, subject folder, scan name).

    In the validation/test layout ``dataset_keys.h5`` is the list of scans, and every listed scan's
    frames and transforms files must exist. Only file names are checked here; ``ScanFile`` and
    ``read_scan`` validate the contents.

    Raises:
        FileNotFoundError: no layout found (naming the root and what was looked for), or a listed
            scan's file is missing (naming the key and the file).
        ValueError: a subject folder that is not a number, a malformed key, or no scans at all.
    """
    root = Path(root)
    layout = detect_layout(root)
    refs = _find_train_scans(root) if layout == LAYOUT_TRAIN else _find_test_scans(root)
    where = root / TRAIN_FOLDER if layout == LAYOUT_TRAIN else root / DATASET_KEYS_FILE
    if not refs:
        raise InputError(f"{where}: no scans found ({layout} layout)")
    folders = {}
    for ref in refs:
        folders.setdefault(ref.subject, set()).add(ref.subject_folder)
    for subject, names in sorted(folders.items()):
        if len(names) > 1:
            # Both folders would be one subject for the folds, its landmark file and the scores: its
            # scans would be trained on and scored twice.
            raise InputError(f"{where}: subject {subject} appears as folders {sorted(names)}; expected one folder "
                             f"per subject ({subject_folder(subject)!r})")
    return sorted(refs, key=lambda ref: (ref.subject, ref.subject_folder, ref.name))


def check_scans(refs, min_frames: int = 2) -> dict[str, tuple[int, int, int]]:
    """Validate every scan before any work: files readable, frames uint8 [N, H, W] with
    N >= ``min_frames``, poses rigid, landmarks (where the subject has a file) in range.

    Reads the headers, the poses and the landmarks, never the frames, so a damaged or short scan is
    reported in seconds instead of after the scans before it were processed. Returns ``{key: (N, H,
    W)}``. Raises as ``ScanFile``, ``read_tforms`` and ``read_landmarks``, and InputError naming the
    scan that is too short.
    """
    sizes = {}
    for ref in refs:
        with ScanFile(ref) as scan_file:
            num_frames = scan_file.num_frames
            if num_frames < min_frames:
                raise InputError(f"{ref.frames_path}: scan {ref.key} has {num_frames} frame(s); at least {min_frames} "
                                 "are needed (the motion of every frame after the first is predicted)")
            scan_file.read_tforms()
            height, width = scan_file.frame_size
        if ref.landmark_path is not None:
            read_landmarks(ref.landmark_path, ref.name, num_frames, height, width)
        sizes[ref.key] = (num_frames, height, width)
    return sizes


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _dataset(handle: h5py.File, key: str, path) -> h5py.Dataset:
    if key not in handle or not isinstance(handle[key], h5py.Dataset):
        raise InputError(f"{path}: no dataset {key!r} (found {sorted(handle.keys())})")
    return handle[key]


def check_frames_shape(shape, dtype, source) -> None:
    """Raise ValueError naming ``source`` unless frames are uint8 and 3-D ``[N, H, W]``."""
    if np.dtype(dtype) != np.uint8:
        raise InputError(f"{source}: 'frames' must be uint8 [N, H, W], got dtype {np.dtype(dtype)}")
    if len(shape) != 3:
        raise InputError(f"{source}: 'frames' must be 3-D [N, H, W], got shape {tuple(shape)}")


def check_tforms_shape(shape, dtype, source, num_frames: int | None = None) -> None:
    """Raise ValueError naming ``source`` unless tforms are float ``[N, 4, 4]`` (N = ``num_frames``)."""
    if len(shape) != 3 or tuple(shape[1:]) != (4, 4):
        raise InputError(f"{source}: 'tforms' must be [N, 4, 4], got shape {tuple(shape)}")
    if np.dtype(dtype).kind != "f":
        raise InputError(f"{source}: 'tforms' must be float32 or float64, got dtype {np.dtype(dtype)}")
    if num_frames is not None and shape[0] != num_frames:
        raise InputError(
            f"{source}: 'tforms' holds {shape[0]} poses but 'frames' holds {num_frames} frames; "
            "expected one pose per frame"
        )


def validate_tforms(tforms: np.ndarray, source, num_frames: int | None = None) -> None:
    """Check tracker poses [N, 4, 4] (tool -> camera): shape, float dtype, finite, rigid.

    Rigid means last row ``[0, 0, 0, 1]`` within ``POSE_LAST_ROW_TOLERANCE`` and a rotation with
    ``max |R^T R - I| <= POSE_ORTHONORMAL_TOLERANCE`` and ``det R > 0`` (computed in float64).
    Raises ValueError naming ``source``, the first bad frame index and the measured value.
    """
    tforms = np.asarray(tforms)
    check_tforms_shape(tforms.shape, tforms.dtype, source, num_frames)
    finite = np.isfinite(tforms).all(axis=(1, 2))
    if not finite.all():
        frame = int(np.argmin(finite))
        raise InputError(f"{source}: 'tforms' has non-finite values at frame {frame}:\n{tforms[frame]}")
    poses = tforms.astype(np.float64)
    row_error = np.abs(poses[:, 3, :] - np.array([0.0, 0.0, 0.0, 1.0])).max(axis=1)
    bad = np.flatnonzero(row_error > POSE_LAST_ROW_TOLERANCE)
    if bad.size:
        frame = int(bad[0])
        raise InputError(
            f"{source}: 'tforms' frame {frame} has last row {poses[frame, 3].tolist()}, expected [0, 0, 0, 1]"
        )
    rotation = poses[:, :3, :3]
    deviation = np.abs(np.swapaxes(rotation, 1, 2) @ rotation - np.eye(3)).max(axis=(1, 2))
    bad = np.flatnonzero(deviation > POSE_ORTHONORMAL_TOLERANCE)
    if bad.size:
        frame = int(bad[0])
        raise InputError(
            f"{source}: 'tforms' frame {frame} is not a rigid pose: max |R^T R - I| = "
            f"{deviation[frame]:.3g} > {POSE_ORTHONORMAL_TOLERANCE:g}"
        )
    determinant = np.linalg.det(rotation)
    bad = np.flatnonzero(determinant <= 0)
    if bad.size:
        frame = int(bad[0])
        raise InputError(
            f"{source}: 'tforms' frame {frame} has a rotation with det = {determinant[frame]:.6g}, "
            "expected +1 (a reflection is not a pose)"
        )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_landmarks(path, scan_name: str, num_frames: int, height: int, width: int) -> np.ndarray:
    """A scan's landmarks from ``landmark_<NNN>.h5``: int64 numpy [K, 3] (frame, x, y), validated.

    Args:
        path: the subject's landmark file.
        scan_name: the dataset to read (the scan's name, without ``.h5``).
        num_frames, height, width: the scan's N, H, W, to check the indices against.
    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the scan's dataset is missing or its values are invalid (``check_landmarks``).
    """
    path = Path(path)
    with open_hdf5(path, "landmark file", "one int [K, 3] dataset per scan") as handle:
        if scan_name not in handle or not isinstance(handle[scan_name], h5py.Dataset):
            raise InputError(f"{path}: no landmark dataset {scan_name!r} (found {sorted(handle.keys())})")
        landmarks = handle[scan_name][()]
    source = f"{path} [{scan_name!r}]"
    return check_landmarks(landmarks, num_frames, height, width, source, integer_dtype=True)


class ScanFile:
    """A scan's HDF5 file(s) kept open, for reading frame windows without reading the scan.

    Open one per worker process (an h5py handle must not cross a fork) and reuse it for every item::

        with ScanFile(ref) as scan:
            tforms = scan.read_tforms()
            window = scan.read_frames(range(10, 14))   # uint8 [4, H, W]

    Opening checks the datasets' presence, dtypes and shapes (metadata only); ``read_tforms``
    validates the pose values.
    """

    def __init__(self, ref: ScanRef):
        self.ref = ref
        self._frames_file = open_hdf5(ref.frames_path, "scan file", f"'{FRAMES_KEY}' uint8 [N, H, W]")
        self._tforms_file = None
        try:
            self._frames = _dataset(self._frames_file, FRAMES_KEY, ref.frames_path)
            check_frames_shape(self._frames.shape, self._frames.dtype, ref.frames_path)
        except BaseException:
            self.close()
            raise

    @property
    def num_frames(self) -> int:
        """N, the number of frames."""
        return int(self._frames.shape[0])

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(H, W)`` in pixels."""
        return int(self._frames.shape[1]), int(self._frames.shape[2])

    def read_frames(self, indices=None) -> np.ndarray:
        """Frames ``indices`` (ints, a range, a slice or None for all) as uint8 numpy [len, H, W].

        Indices may be in any order and repeat; a contiguous ascending run is read as one slice.
        Raises ValueError naming the file for an index outside 0..N-1.
        """
        if indices is None:
            return _read(self._frames, (), self.ref.frames_path)
        if isinstance(indices, slice):
            return _read(self._frames, indices, self.ref.frames_path)
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size == 0:
            return np.empty((0, *self.frame_size), np.uint8)
        bad = np.flatnonzero((index < 0) | (index >= self.num_frames))
        if bad.size:
            raise InputError(
                f"{self.ref.frames_path}: frame index {int(index[bad[0]])} outside 0..{self.num_frames - 1}"
            )
        start = int(index[0])
        if np.array_equal(index, np.arange(start, start + index.size)):
            return _read(self._frames, slice(start, start + index.size), self.ref.frames_path)
        # h5py fancy indexing needs strictly increasing indices: read each frame once, then reorder.
        unique, inverse = np.unique(index, return_inverse=True)
        return _read(self._frames, unique, self.ref.frames_path)[inverse]

    def read_tforms(self) -> np.ndarray:
        """All poses, numpy [N, 4, 4] as stored (float32/64), tracker tool -> camera (mm), validated."""
        path = self.ref.tforms_path
        if self._tforms_file is None:
            if Path(path) == Path(self.ref.frames_path):
                self._tforms_file = self._frames_file
            else:
                self._tforms_file = open_hdf5(path, "transforms file", f"'{TFORMS_KEY}' float [N, 4, 4]")
        dataset = _dataset(self._tforms_file, TFORMS_KEY, path)
        check_tforms_shape(dataset.shape, dataset.dtype, path, self.num_frames)
        tforms = _read(dataset, (), path)
        validate_tforms(tforms, path)
        return tforms

    def close(self) -> None:
        for handle in (self._tforms_file, self._frames_file):
            if handle is not None and handle.id.valid:
                handle.close()

    def __enter__(self) -> ScanFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _read(dataset: h5py.Dataset, selection, path) -> np.ndarray:
    """``dataset[selection]``; a damaged file raises InputError naming it, not h5py's bare OSError."""
    try:
        return dataset[selection]
    except OSError as error:
        raise InputError(f"{path}: cannot read {dataset.name.lstrip('/')!r} ({_h5_reason(error)}): the file is "
                         "damaged (copy it again)") from None


def read_scan(ref: ScanRef) -> Scan:
    """Read and validate a whole scan: frames, poses and (where the subject has a file) landmarks.

    Returns a ``Scan`` (see its attributes for shapes and dtypes). Raises as ``ScanFile``,
    ``validate_tforms`` and ``read_landmarks``.
    """
    with ScanFile(ref) as scan_file:
        frames = scan_file.read_frames()
        tforms = scan_file.read_tforms()
    landmarks = None
    if ref.landmark_path is not None:
        landmarks = read_landmarks(ref.landmark_path, ref.name, frames.shape[0], frames.shape[1], frames.shape[2])
    return Scan(ref.name, ref.subject, ref.key, frames, tforms, landmarks)


# --------------------------------------------------------------------------------------------
# Writing (the simulator's and the tests'); every file goes through a temporary name
# --------------------------------------------------------------------------------------------


def _write_h5(path: Path, datasets: dict, compression: str | None) -> None:
    size = None if compression is not None else sum(np.asarray(value).nbytes for value in datasets.values())
    with atomic_path(path) as tmp:
        with writing_hdf5(tmp, reserve=size) as handle:
            for key, value in datasets.items():
                if key == FRAMES_KEY and compression is not None:
                    # One chunk per frame, so a window read decompresses only its own frames.
                    handle.create_dataset(key, data=value, chunks=(1, *value.shape[1:]), compression=compression)
                else:
                    handle.create_dataset(key, data=value)


def write_scan(
    root,
    subject: int,
    scan_name: str,
    frames: np.ndarray,
    tforms: np.ndarray,
    layout: str = LAYOUT_TRAIN,
    compression: str | None = None,
) -> ScanRef:
    """Write one scan in the challenge layout and return its ``ScanRef``.

    Args:
        root: dataset root.
        subject: subject id (folder ``%03d``).
        scan_name: file name without ``.h5``.
        frames: uint8 [N, H, W].
        tforms: [N, 4, 4] rigid tool -> camera poses (mm), any float dtype; stored as float32 as
            the challenge stores them (and validated after that cast).
        layout: ``"train"`` (one file in ``frames_transfs/<NNN>/``) or ``"test"`` (``frames/<NNN>/``
            and ``transfs/<NNN>/``; list the scan with ``write_dataset_keys``).
        compression: None (contiguous, like the challenge) or an h5py filter such as ``"gzip"``.
    Raises ValueError, before writing, for frames or poses the readers would refuse.
    """
    if layout not in LAYOUTS:
        raise InputError(f"layout={layout!r} is not one of {list(LAYOUTS)}")
    root = Path(root)
    folder = subject_folder(subject)
    frames = np.asarray(frames)
    tforms = np.asarray(tforms).astype(np.float32)
    source = f"write_scan({scan_name!r})"
    check_frames_shape(frames.shape, frames.dtype, source)
    validate_tforms(tforms, source, num_frames=frames.shape[0])
    if layout == LAYOUT_TRAIN:
        path = root / TRAIN_FOLDER / folder / f"{scan_name}.h5"
        _write_h5(path, {FRAMES_KEY: frames, TFORMS_KEY: tforms}, compression)
        frames_path = tforms_path = path
    else:
        frames_path = root / FRAMES_FOLDER / folder / f"{scan_name}.h5"
        tforms_path = root / TFORMS_FOLDER / folder / f"{scan_name}.h5"
        _write_h5(frames_path, {FRAMES_KEY: frames}, compression)
        _write_h5(tforms_path, {TFORMS_KEY: tforms}, None)
    return ScanRef(
        int(subject), folder, scan_name, frames_path, tforms_path, landmark_path(root, subject), dataset_key(folder, scan_name)
    )


def write_landmarks(root, subject: int, landmarks: dict, folder: str = LANDMARK_FOLDERS[0]) -> Path:
    """Write ``<root>/<folder>/landmark_<NNN>.h5`` with one int64 [K, 3] dataset per scan name.

    ``landmarks`` maps scan name -> integer array [K, 3] (frame from 0, x from 1, y from 1); frame
    0 is refused (it has no DDF row), as are x or y below 1. ``folder`` is ``"landmarks"`` or the
    2024 test set's ``"landmark"``. Returns the path.
    """
    if folder not in LANDMARK_FOLDERS:
        raise InputError(f"landmark folder {folder!r} is not one of {list(LANDMARK_FOLDERS)}")
    path = Path(root) / folder / landmark_file_name(subject)
    arrays = {}
    for scan_name, values in landmarks.items():
        values = np.asarray(values)
        big = np.iinfo(np.int64).max  # upper bounds are checked against the scan when read
        arrays[scan_name] = check_landmarks(values, big, big, big, f"write_landmarks({path.name}, {scan_name!r})",
                                            integer_dtype=True)
    _write_h5(path, arrays, None)
    return path


def write_dataset_keys(root, keys) -> Path:
    """Write ``<root>/dataset_keys.h5`` listing ``keys`` (``sub<NNN>__<scan>``); returns the path.

    Readers use only the key names; each entry stores the scan's frames file relative to the root,
    as a string, so the file also says where the scan is.
    """
    path = Path(root) / DATASET_KEYS_FILE
    keys = sorted(keys)
    entries = {}
    for key in keys:
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise InputError(f"dataset key {key!r} is not of the form 'sub<NNN>__<scan>'")
        entries[key] = f"{FRAMES_FOLDER}/{match.group(1)}/{match.group(2)}.h5"
    if len(set(keys)) != len(keys):
        raise InputError(f"duplicate dataset keys in {keys}")
    with atomic_path(path) as tmp:
        with writing_hdf5(tmp) as handle:
            for key, relative in entries.items():
                handle.create_dataset(key, data=relative)
    return path
