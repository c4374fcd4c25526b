"""The training data pipeline: subject-level folds, frame windows, down-sampling and its cache.

What the official baseline's ``utils/loader.py`` does, with the same semantics where they are part
of the contract and without its flaws:

- **Folds** (``subject_folds``): the baseline's subject-level split, ``partition_by_ratio(ratios=
  [1] * 5, randomise=True)`` with ``random.Random(4)``, so a given dataset gets the same train /
  validation / test subjects as the challenge code (train = folds 0-2, validation = 3, test = 4).
  The split is written once per run as JSON (``write_folds``) and read back validated.
- **Windows** (``FrameWindowDataset``): one item = ``num_samples`` sorted frames drawn from a
  random range of ``sample_range`` consecutive frames of one scan, with the scan's tracker poses.
  Unlike the baseline, an item is a pure function of ``(scan index, draw seed)``, each worker
  opens each HDF5 file once and keeps it (the baseline opens one per item and never closes it),
  and the poses are validated once per scan.
- **Epochs** (``EpochSampler``): which scans, in which order, with which draw seeds; deterministic
  for ``(seed, epoch)``, sharded over DDP ranks like ``DistributedSampler``, resumable mid-epoch.
- **Down-sampling** (``downsample_frames``, ``downsampled_calibration``, ``cache_downsampled_scans``):
  area down-sampling of the images for CPU training, optionally cached on disk. The training labels
  do not change: they are computed from the poses and the *original* calibration, in the original
  image's mm frame (the network just sees smaller images).

Conventions (DESIGN.md sections 2 and 3): frames are uint8 ``[N, H, W]`` (row y, column x, pixel
(1, 1) at index [0, 0]); ``tforms[i]`` maps tracker tool -> camera (mm) for frame i.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.utils.data

from utils.atomic import atomic_path
from utils.augmentation import Mirror, apply_gain
from utils.calibration import Calibration, make_calibration
from utils.challenge_data import (
    FRAMES_KEY,
    TFORMS_KEY,
    TRAIN_FOLDER,
    ScanFile,
    ScanRef,
    detect_layout,
)
from utils.errors import InputError
from utils.hdf5_writing import writing_hdf5

logger = logging.getLogger(__name__)

# Frames per slab when caching or reading a whole scan: 64 frames of 480x640 are 20 MB of uint8
# (80 MB as the float32 block sums), whatever the scan's length.
CACHE_CHUNK_FRAMES = 64
# Bumped whenever the cache's file contents change meaning, so old caches are never reused.
CACHE_FORMAT_VERSION = 1
FOLDS_FILE_KEYS = ("data_root", "split_seed", "num_folds", "folds", "scans")

# Baseline defaults: 5 folds shuffled with random.Random(4); train = folds 0-2, val = 3, test = 4.
DEFAULT_NUM_FOLDS = 5
DEFAULT_SPLIT_SEED = 4
TRAIN_FOLDS = (0, 1, 2)
VAL_FOLDS = (3,)
TEST_FOLDS = (4,)


# --------------------------------------------------------------------------------------------
# Dataset root and subject folds
# --------------------------------------------------------------------------------------------


def resolve_data_root(path) -> Path:
    """The dataset root for ``path``: a root of either layout, or the baseline's ``frames_transfs``.

    The baseline's ``--DATA_PATH`` points at ``<root>/frames_transfs``; ours points at ``<root>``
    (where ``calib_matrix.csv`` and ``landmarks/`` also are). Both are accepted, so commands from
    the challenge README keep working.

    Returns:
        the root as a ``Path`` (the parent of ``path`` when ``path`` is a ``frames_transfs`` folder).
    Raises:
        FileNotFoundError: ``path`` does not exist or is neither a dataset root (holding
            ``frames_transfs/`` or ``dataset_keys.h5``) nor a root's ``frames_transfs/`` folder.
        ValueError: the root holds both layouts (see ``detect_layout``).
    """
    path = Path(path)
    expected = (
        f"expected a TUS-REC dataset root (holding {TRAIN_FOLDER}/ or dataset_keys.h5) "
        f"or its {TRAIN_FOLDER}/ folder"
    )
    if not path.is_dir():
        raise FileNotFoundError(f"data path not found or not a folder: {path}; {expected}")
    if path.name == TRAIN_FOLDER and not (path / TRAIN_FOLDER).is_dir():
        path = path.parent  # the baseline's --DATA_PATH
    try:
        detect_layout(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a dataset root; {expected}") from None
    return path


def subject_folds(subjects: Sequence[int], num_folds: int = DEFAULT_NUM_FOLDS,
                  seed: int = DEFAULT_SPLIT_SEED) -> list[list[int]]:
    """The baseline's subject-level split into ``num_folds`` folds, as lists of subject ids.

    Exactly ``Dataset.partition_by_ratio(ratios=[1] * num_folds, randomise=True)``: with n sorted
    subjects, fold sizes are ``int(n * (1 / num_folds))`` plus one for each of the first
    ``n - sum(sizes)`` folds; positions ``0..n-1`` are shuffled with
    ``random.Random(seed).shuffle`` and fold k takes the next ``sizes[k]`` of them. Positions index
    the *sorted* subject ids, so the split depends only on the set of subjects, not their order.

    Args:
        subjects: subject ids (e.g. ``{ref.subject for ref in find_scans(root)}``), distinct.
        num_folds: number of folds (the baseline: 5; train = 0-2, validation = 3, test = 4).
        seed: the shuffle's seed (the baseline: 4).
    Returns:
        ``num_folds`` lists of subject ids, in the shuffled order; disjoint, covering ``subjects``.
    Raises:
        ValueError: fewer subjects than folds, ``num_folds < 1``, or repeated subject ids.
    """
    ids = sorted(int(s) for s in subjects)
    if num_folds < 1:
        raise InputError(f"num_folds={num_folds}: expected at least 1")
    if len(set(ids)) != len(ids):
        repeated = sorted({s for s in ids if ids.count(s) > 1})
        raise InputError(f"subject ids must be distinct; repeated: {repeated}")
    n = len(ids)
    if n < num_folds:
        raise InputError(f"cannot split {n} subject(s) into {num_folds} folds: need at least {num_folds} subjects")
    # The baseline normalises the ratios and truncates n * ratio; written the same way so the float
    # rounding (and so the fold sizes) is the baseline's for every n and num_folds.
    ratio = 1 / num_folds
    sizes = [int(n * ratio) for _ in range(num_folds)]
    for k in range(n - sum(sizes)):
        sizes[k] += 1
    positions = list(range(n))
    random.Random(seed).shuffle(positions)
    starts = np.cumsum([0] + sizes)
    return [[ids[p] for p in positions[starts[k]:starts[k + 1]]] for k in range(num_folds)]


def scan_keys_by_subject(scans: Sequence[ScanRef]) -> dict[int, list[str]]:
    """``{subject id: sorted scan keys (sub<NNN>__<scan>)}`` of ``scans``, for ``write_folds``."""
    grouped: dict[int, list[str]] = {}
    for ref in scans:
        grouped.setdefault(ref.subject, []).append(ref.key)
    return {subject: sorted(keys) for subject, keys in sorted(grouped.items())}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_folds(folds, source: str) -> list[list[int]]:
    if not isinstance(folds, (list, tuple)) or not folds:
        raise InputError(f"{source}: 'folds' must be a non-empty list of lists of subject ids, got {folds!r}")
    seen: dict[int, int] = {}
    checked = []
    for k, fold in enumerate(folds):
        if not isinstance(fold, (list, tuple)):
            raise InputError(f"{source}: 'folds'[{k}] must be a list of subject ids, got {fold!r}")
        ids = []
        for subject in fold:
            if isinstance(subject, np.integer):
                subject = int(subject)
            if not _is_int(subject) or subject < 0:
                raise InputError(f"{source}: 'folds'[{k}] holds {subject!r}; subject ids are integers >= 0")
            if subject in seen:
                raise InputError(f"{source}: subject {subject} is in both fold {seen[subject]} and fold {k}")
            seen[subject] = k
            ids.append(subject)
        checked.append(ids)
    return checked


def write_folds(path, folds, data_root, seed: int, scans_by_subject: dict[int, list[str]]) -> Path:
    """Write a split as JSON (atomically) and return ``path``.

    Format::

        {"data_root": "<root>", "split_seed": 4, "num_folds": 5,
         "folds": [[subject ids of fold 0], ...],
         "scans": {"0": ["sub000__LH_rotation", ...], ...}}

    ``folds`` is what ``subject_folds`` returns; ``scans`` lists, per fold, the scan keys of its
    subjects (for a reader, and to see later which scans a run used); ``scans_by_subject`` maps a
    subject id to its scan keys (``scan_keys_by_subject``). Only ``folds`` drives the split.

    Raises ValueError (before writing) for folds that are not disjoint lists of ids >= 0.
    """
    path = Path(path)
    folds = _check_folds(folds, f"write_folds({path})")
    if not _is_int(seed):
        raise InputError(f"write_folds({path}): seed must be an integer, got {seed!r}")
    scans = {
        str(k): [key for subject in sorted(fold) for key in sorted(scans_by_subject.get(subject, []))]
        for k, fold in enumerate(folds)
    }
    record = {
        "data_root": str(data_root),
        "split_seed": seed,
        "num_folds": len(folds),
        "folds": folds,
        "scans": scans,
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def read_folds(path) -> list[list[int]]:
    """Read a split written by ``write_folds``: ``num_folds`` lists of subject ids.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming the file and the field: not JSON, not an object, a missing field,
            ``num_folds`` not the number of folds, folds not disjoint lists of integers >= 0,
            ``split_seed`` not an integer, ``scans`` not ``{"<fold>": [keys]}`` per fold.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"folds file not found: {path}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a valid JSON folds file ({error})") from None
    if not isinstance(record, dict):
        raise InputError(
            f"{path}: expected a JSON object with fields {list(FOLDS_FILE_KEYS)}, got {type(record).__name__}"
        )
    missing = [key for key in FOLDS_FILE_KEYS if key not in record]
    if missing:
        raise InputError(f"{path}: missing field(s) {missing}; expected {list(FOLDS_FILE_KEYS)}")
    folds = _check_folds(record["folds"], str(path))
    if not _is_int(record["num_folds"]) or record["num_folds"] != len(folds):
        raise InputError(f"{path}: 'num_folds' is {record['num_folds']!r} but 'folds' holds {len(folds)} folds")
    if not _is_int(record["split_seed"]):
        raise InputError(f"{path}: 'split_seed' must be an integer, got {record['split_seed']!r}")
    if not isinstance(record["data_root"], str):
        raise InputError(f"{path}: 'data_root' must be a string, got {record['data_root']!r}")
    scans = record["scans"]
    expected_keys = [str(k) for k in range(len(folds))]
    if not isinstance(scans, dict) or sorted(scans, key=str) != sorted(expected_keys):
        found = sorted(scans) if isinstance(scans, dict) else scans
        raise InputError(f"{path}: 'scans' must map each fold {expected_keys} to a list of scan keys, got {found!r}")
    for k, keys in scans.items():
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise InputError(f"{path}: 'scans'[{k!r}] must be a list of scan keys (strings), got {keys!r}")
    return folds


def scans_of_folds(scans: list[ScanRef], folds, fold_ids: Sequence[int]) -> list[ScanRef]:
    """The scans whose subjects are in folds ``fold_ids``, sorted by (subject, scan name).

    Args:
        scans: every scan of the dataset (``find_scans``).
        folds: lists of subject ids (``subject_folds`` / ``read_folds``).
        fold_ids: which folds, e.g. ``TRAIN_FOLDS``.
    Raises:
        ValueError: a fold id outside ``0..len(folds)-1``, or a subject of the chosen folds with no
            scan in ``scans`` (the split does not belong to this dataset).
    """
    chosen: set[int] = set()
    for fold_id in fold_ids:
        if not _is_int(fold_id) and not isinstance(fold_id, np.integer):
            raise InputError(f"fold id {fold_id!r} must be an integer in 0..{len(folds) - 1}")
        if not 0 <= fold_id < len(folds):
            raise InputError(f"fold id {fold_id} is out of range: there are {len(folds)} folds (0..{len(folds) - 1})")
        chosen.update(int(s) for s in folds[fold_id])
    selected = [ref for ref in scans if ref.subject in chosen]
    missing = sorted(chosen - {ref.subject for ref in selected})
    if missing:
        raise InputError(
            f"subject(s) {missing} of folds {list(fold_ids)} have no scans in the dataset; "
            "the folds file belongs to another dataset (delete it or point to the right data root)"
        )
    return sorted(selected, key=lambda ref: (ref.subject, ref.name))


# --------------------------------------------------------------------------------------------
# Down-sampling
# --------------------------------------------------------------------------------------------


def _check_factor(factor, height: int, width: int) -> int:
    if not (_is_int(factor) or isinstance(factor, np.integer)) or factor < 1:
        raise InputError(f"down-sampling factor {factor!r}: expected an integer >= 1")
    if factor > min(height, width):
        raise InputError(f"down-sampling factor {factor} is larger than the image ({height} x {width} pixels)")
    return int(factor)


def downsample_frames(frames, factor: int):
    """Area (block-mean) down-sampling of uint8 images by an integer ``factor``.

    Output pixel ``(r, c)`` is the mean of input rows ``r*f .. r*f+f-1`` and columns
    ``c*f .. c*f+f-1``, rounded to nearest, ties to even (``np.rint``). Trailing rows/columns that
    do not fill a block are dropped, so output pixel 1 is input block 1 and the image mm frame keeps
    its origin (see ``downsampled_calibration``). The block sums are integers, exact in float32 for
    any factor up to 256, and the mean is one correctly rounded float32 division, so numpy and
    torch inputs give identical bytes (the on-the-fly path and the cache agree).

    Args:
        frames: uint8 numpy array or torch tensor ``[..., H, W]``.
        factor: integer >= 1; 1 returns ``frames`` itself.
    Returns:
        the same kind (numpy / torch, torch on the same device), uint8 ``[..., H // f, W // f]``.
    Raises:
        ValueError: not uint8, fewer than 2 dimensions, or a factor < 1 or larger than the image.
    """
    is_torch = isinstance(frames, torch.Tensor)
    if not is_torch:
        frames = np.asarray(frames)
    if frames.dtype not in (np.uint8, torch.uint8):
        raise InputError(f"downsample_frames: frames must be uint8, got {frames.dtype}")
    if frames.ndim < 2:
        raise InputError(f"downsample_frames: frames must be [..., H, W], got shape {tuple(frames.shape)}")
    height, width = int(frames.shape[-2]), int(frames.shape[-1])
    factor = _check_factor(factor, height, width)
    if factor == 1:
        return frames
    h, w = height // factor, width // factor
    blocks = frames[..., : h * factor, : w * factor].reshape(*frames.shape[:-2], h, factor, w * factor)
    # Strided slice additions, rows then columns: several times faster than a reduction over a
    # [.., h, f, w, f] view. Row sums of f pixels are exact in uint16 up to f = 257 (int32 in
    # torch, which lacks uint16 arithmetic); the block sums are integers below 2^24, exact in
    # float32 up to f = 256.
    if is_torch:
        rows = blocks[..., 0, :].to(torch.int32)
    else:
        rows = blocks[..., 0, :].astype(np.uint16 if 255 * factor <= 65535 else np.uint32)
    for dr in range(1, factor):
        rows += blocks[..., dr, :]
    if is_torch:
        sums = rows[..., 0::factor].to(torch.float32)
        for dc in range(1, factor):
            sums += rows[..., dc::factor]
        return torch.round(sums / (factor * factor)).to(torch.uint8)  # round: half to even, as np.rint
    sums = rows[..., 0::factor].astype(np.float32)
    for dc in range(1, factor):
        sums += rows[..., dc::factor]
    sums /= np.float32(factor * factor)
    return np.rint(sums, out=sums).astype(np.uint8)


def downsampled_calibration(calibration: Calibration, factor: int) -> Calibration:
    """The exact calibration of images down-sampled by ``downsample_frames(.., factor)``.

    Down-sampled pixel k (1-based, along x or y) is the mean of original pixels
    ``(k-1)f+1 .. kf``, whose centre is original pixel ``(k-1)f + (f+1)/2``, i.e. original mm
    ``s*f*k - s*(f-1)/2``. Hence ``S' = S @ diag(f, f, 1, 1)`` and ``C' = C @ Tr(-o)`` with
    ``o = ((f-1)/2 * sx, (f-1)/2 * sy, 0)`` mm: ``C' S' p'`` is the tracker-tool point of the block
    centre. The image mm frame of the result is shifted by ``o`` from the original's.

    Training labels do not use this: they stay in the original image mm frame (the network only
    sees smaller images). Use it to compound or evaluate down-sampled frames.

    Args:
        calibration: the original ``Calibration`` (float64 ``S`` pixel -> mm, ``C`` mm -> tool).
        factor: integer >= 1; 1 returns ``calibration``.
    Returns:
        a validated ``Calibration`` (float64).
    """
    if not (_is_int(factor) or isinstance(factor, np.integer)) or factor < 1:
        raise InputError(f"down-sampling factor {factor!r}: expected an integer >= 1")
    factor = int(factor)
    if factor == 1:
        return calibration
    sx, sy = calibration.pixel_size_mm
    scale = calibration.scale @ np.diag([factor, factor, 1.0, 1.0])
    shift = np.eye(4)
    shift[:3, 3] = [-(factor - 1) / 2 * sx, -(factor - 1) / 2 * sy, 0.0]
    return make_calibration(scale, calibration.calib_R_T @ shift, source=f"downsampled_calibration(factor={factor})")


def read_scan_frames(ref: ScanRef, downsample: int = 1, chunk: int = 256) -> np.ndarray:
    """All frames of a scan, down-sampled: uint8 numpy ``[N, H // f, W // f]``.

    Reads ``chunk`` frames at a time, so the working memory beyond the result is one chunk (and its
    float32 block sums) whatever N. For whole-scan inference.
    """
    if not _is_int(chunk) or chunk < 1:
        raise InputError(f"chunk={chunk!r}: expected an integer >= 1")
    with ScanFile(ref) as scan:
        height, width = scan.frame_size
        factor = _check_factor(downsample, height, width)
        if factor == 1:
            return scan.read_frames()
        out = np.empty((scan.num_frames, height // factor, width // factor), np.uint8)
        for start in range(0, scan.num_frames, chunk):
            stop = min(start + chunk, scan.num_frames)
            out[start:stop] = downsample_frames(scan.read_frames(slice(start, stop)), factor)
    return out


MEASUREMENT_FOLDER = "measurements"


def measurement_cache_path(cache_dir, model_key: str, ref: ScanRef, read_factor: int, device_type: str) -> Path:
    """Where ``--feature_cache`` keeps one scan's measurements between runs (with ``--cache_dir``):
    ``cache_dir/measurements/<digest>.pt``.

    The digest covers the measuring network (``SeqFlowNet.measurement_key``: weights, settings, code
    version), the scan's frames file (resolved path, size, mtime), the read factor and the device type
    (a GPU's arithmetic differs from a CPU's in the last bits), so any change gives a new name; files
    of older inputs are never read again, only left (delete the folder to reclaim the space).
    """
    record = {"format": CACHE_FORMAT_VERSION, "model": model_key, "key": ref.key,
              "frames": _file_signature(ref.frames_path), "factor": int(read_factor), "device": str(device_type)}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]
    return Path(cache_dir) / MEASUREMENT_FOLDER / f"{digest}.pt"


def save_measurements(path, rows: dict) -> None:
    """Write one scan's measurements (a nested dict of CPU tensors) atomically: a file that exists is whole."""
    with atomic_path(path) as tmp:
        torch.save(rows, tmp)


def load_measurements(path) -> dict:
    """Read what ``save_measurements`` wrote; InputError naming the file if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (torch raises several kinds for a damaged file)
        first_line = (str(error).strip().splitlines() or [""])[0]  # torch's messages run to paragraphs
        raise InputError(f"{path}: unreadable measurement cache file ({type(error).__name__}: {first_line}); "
                         f"delete it to measure the scan again") from None


def _file_signature(path) -> dict:
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_fingerprint(scans: Sequence[ScanRef], factor: int) -> str:
    """16 hex digits identifying (factor, each scan's source files by path, size and mtime)."""
    record = {
        "format": CACHE_FORMAT_VERSION,
        "factor": int(factor),
        "scans": [
            {"key": ref.key, "frames": _file_signature(ref.frames_path), "tforms": _file_signature(ref.tforms_path)}
            for ref in scans
        ],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _cached_file_ok(path: Path, num_frames: int, shape: tuple[int, int]) -> bool:
    # Files appear only through an atomic rename, so a present file is complete; the shape check
    # guards against a file someone put there by hand.
    try:
        with h5py.File(path, "r") as handle:
            return (
                handle[FRAMES_KEY].shape == (num_frames, *shape)
                and handle[FRAMES_KEY].dtype == np.uint8
                and handle[TFORMS_KEY].shape == (num_frames, 4, 4)
            )
    except (OSError, KeyError):
        return False


def cache_downsampled_scans(scans: list[ScanRef], factor: int, cache_dir, progress: bool = False) -> list[ScanRef]:
    """Write (or reuse) down-sampled copies of ``scans`` and return refs pointing at them.

    Layout: ``cache_dir/<fingerprint>/frames_transfs/<NNN>/<scan>.h5`` (the train layout), each
    file holding ``'frames'`` uint8 ``[N, H // f, W // f]`` (``downsample_frames``, written in
    slabs of ``CACHE_CHUNK_FRAMES`` frames: constant memory) and ``'tforms'`` as stored in the
    source (validated on the way). The fingerprint (``cache_fingerprint``) covers the factor and
    every source file's resolved path, size and mtime, so a changed source gets a new folder and a
    second call with the same inputs rewrites nothing. Each file is written atomically; concurrent
    writers (several ranks) are safe, though wasteful: let one rank build the cache first.

    Args:
        scans: the scans to cache (any layout).
        factor: integer >= 1 (1 copies the frames unchanged).
        cache_dir: the cache's root folder (created).
        progress: show a tqdm bar over scans.
    Returns:
        ``ScanRef``s into the cache, in the order of ``scans``, with the source's subject, subject
        folder, name, key and landmark path (landmarks are not copied).
    Raises:
        ValueError: two scans with the same key (from two datasets), or a factor < 1 or larger
            than a scan's frames.
    """
    from tqdm import tqdm

    scans = list(scans)
    seen: dict[tuple[str, str], ScanRef] = {}
    for ref in scans:
        other = seen.setdefault((ref.subject_folder, ref.name), ref)
        if other is not ref:
            raise InputError(
                f"cache_downsampled_scans: {other.frames_path} and {ref.frames_path} are both scan "
                f"{ref.key}; one cache holds one dataset's scans (cache each dataset separately)"
            )
    fingerprint = cache_fingerprint(scans, factor)
    root = Path(cache_dir) / fingerprint
    logger.info("down-sampled cache (factor %d) for %d scan(s): %s", factor, len(scans), root)
    written = reused = 0
    cached = []
    for ref in tqdm(scans, desc=f"caching frames / {factor}", unit="scan", disable=not progress):
        path = root / TRAIN_FOLDER / ref.subject_folder / f"{ref.name}.h5"
        with ScanFile(ref) as source:
            height, width = source.frame_size
            _check_factor(factor, height, width)
            shape = (height // factor, width // factor)
            if path.is_file() and _cached_file_ok(path, source.num_frames, shape):
                reused += 1
                logger.debug("reusing %s", path)
            else:
                tforms = source.read_tforms()
                size = source.num_frames * shape[0] * shape[1]  # uint8 frames
                with atomic_path(path) as tmp, writing_hdf5(tmp, reserve=size) as out:
                    frames = out.create_dataset(FRAMES_KEY, shape=(source.num_frames, *shape), dtype=np.uint8)
                    for start in range(0, source.num_frames, CACHE_CHUNK_FRAMES):
                        stop = min(start + CACHE_CHUNK_FRAMES, source.num_frames)
                        frames[start:stop] = downsample_frames(source.read_frames(slice(start, stop)), factor)
                    out.create_dataset(TFORMS_KEY, data=tforms)
                written += 1
                logger.debug("wrote %s (%d frames, %d x %d)", path, source.num_frames, *shape)
        cached.append(ScanRef(ref.subject, ref.subject_folder, ref.name, path, path, ref.landmark_path, ref.key))
    manifest = root / "cache.json"
    if written or not manifest.is_file():
        record = {"format": CACHE_FORMAT_VERSION, "factor": int(factor),
                  "sources": {ref.key: str(Path(ref.frames_path).resolve()) for ref in scans}}
        with atomic_path(manifest) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("down-sampled cache: %d scan(s) written, %d reused", written, reused)
    return cached


# --------------------------------------------------------------------------------------------
# Frame windows
# --------------------------------------------------------------------------------------------


def default_max_open_files() -> int:
    """How many scan files one ``FrameWindowDataset`` keeps open per process: a quarter of the
    open-file limit (``RLIMIT_NOFILE``), at least 64; unbounded where the limit is unknown."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 2**31
    if soft == resource.RLIM_INFINITY:
        return 2**31
    return max(64, soft // 4)


class FrameWindowDataset(torch.utils.data.Dataset):
    """Windows of frames with their tracker poses, one scan per index (the baseline's ``Dataset``).

    Item ``(scan_index, draw_seed)`` (or a plain int k, meaning ``(k, k)``) draws, with
    ``rng = np.random.default_rng(draw_seed)``:

    - a stride ``s`` uniform in ``1..min(max_stride, (N-1) // (sample_range-1))``;
    - a start ``n0`` uniform in ``0..N-1 - s*(sample_range-1)``;
    - ``num_samples`` distinct sorted offsets in ``0..sample_range-1``;

    and reads frames ``n0 + s * offsets``; with probability ``reverse_prob`` the window is then
    reversed (reversed playback: the labels, computed from the poses in window order, come out as
    the inverse transforms); with probability ``flip_prob`` it is mirrored left-right with its
    poses mirrored to match (``utils.augmentation.Mirror``, which ``mirror`` describes), and its
    frames are multiplied by a gain uniform in ``1 +- gain_jitter`` (``apply_gain``). With the
    defaults (``max_stride=1``, ``reverse_prob=0``, ``flip_prob=0``, ``gain_jitter=0``) this is the
    baseline's ``frame_sampler``; each augmentation's draws come after the others', so a seed's
    window does not depend on whether a later augmentation is on.

    Returns ``(frames, tforms, scan_index)``: frames torch.uint8 ``[num_samples, h, w]``
    (down-sampled by ``downsample``), tforms torch.float64 ``[num_samples, 4, 4]`` (the stored
    poses of those frames, tracker tool -> camera, mm), scan_index an int.

    A plain int key always gives the same window of that scan: train with ``EpochSampler``, whose
    draw seeds change with the epoch.

    Each process opens each scan's file once, lazily, and keeps it; a fork (DataLoader workers) is
    detected by pid and the files are reopened. The dataset pickles without its handles. At most
    ``max_open_files`` files stay open per process (``default_max_open_files``: a quarter of the
    open-file limit; the 2024 training folds hold 720 scans, a common default limit is 1024); past
    that the least recently used is closed, with a warning. Poses stay cached regardless.
    """

    def __init__(self, scans: list[ScanRef], num_samples: int, sample_range: int, downsample: int = 1,
                 reverse_prob: float = 0.0, max_stride: int = 1, flip_prob: float = 0.0,
                 mirror: Mirror | None = None, gain_jitter: float = 0.0):
        scans = list(scans)
        if not scans:
            raise InputError("FrameWindowDataset: no scans given")
        if not _is_int(num_samples) or num_samples < 2:
            raise InputError(f"num_samples={num_samples!r}: expected an integer >= 2 (a window holds at least a pair)")
        if not _is_int(sample_range) or sample_range < num_samples:
            raise InputError(f"sample_range={sample_range!r}: expected an integer >= num_samples={num_samples}")
        if not _is_int(max_stride) or max_stride < 1:
            raise InputError(f"max_stride={max_stride!r}: expected an integer >= 1")
        for name, value in (("reverse_prob", reverse_prob), ("flip_prob", flip_prob)):
            if not 0.0 <= float(value) <= 1.0:
                raise InputError(f"{name}={value!r}: expected a probability in [0, 1]")
        if flip_prob > 0 and mirror is None:
            raise InputError(f"flip_prob={flip_prob}: mirroring needs the calibration and frame width (mirror=Mirror...)")
        if not 0.0 <= float(gain_jitter) < 1.0:
            raise InputError(f"gain_jitter={gain_jitter!r}: expected a fraction in [0, 1)")
        self.flip_prob, self.mirror, self.gain_jitter = float(flip_prob), mirror, float(gain_jitter)
        self.scans = scans
        self.num_samples = int(num_samples)
        self.sample_range = int(sample_range)
        self.reverse_prob = float(reverse_prob)
        self.max_stride = int(max_stride)

        lengths, sizes = [], []
        for ref in scans:  # metadata only; the files are closed again
            with ScanFile(ref) as scan:
                lengths.append(scan.num_frames)
                sizes.append(scan.frame_size)
        for ref, length in zip(scans, lengths):
            if length < self.sample_range:
                raise InputError(
                    f"scan {ref.key} ({ref.frames_path}) has {length} frames, fewer than "
                    f"sample_range={self.sample_range}; lower sample_range or leave the scan out"
                )
        if len(set(sizes)) > 1:
            first = sizes[0]
            other = next(i for i, size in enumerate(sizes) if size != first)
            raise InputError(
                f"scans differ in frame size: {scans[0].key} is {first[0]} x {first[1]}, "
                f"{scans[other].key} is {sizes[other][0]} x {sizes[other][1]}; a batch needs one size"
            )
        self._scan_lengths = lengths
        self.original_frame_size = sizes[0]
        self.downsample = _check_factor(downsample, *sizes[0])
        self.max_open_files = default_max_open_files()
        self._warned_eviction = False
        self._files: OrderedDict[int, ScanFile] = OrderedDict()  # least recently used first
        self._poses: dict[int, np.ndarray] = {}
        self._owner_pid: int | None = None

    @property
    def scan_lengths(self) -> list[int]:
        """Number of frames N of each scan, in the order of ``scans``."""
        return list(self._scan_lengths)

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(h, w)`` of the returned frames, after down-sampling, in pixels."""
        height, width = self.original_frame_size
        return height // self.downsample, width // self.downsample

    def __len__(self) -> int:
        return len(self.scans)

    def window_indices(self, scan_index: int, draw_seed: int) -> np.ndarray:
        """The frame indices of item ``(scan_index, draw_seed)``: int64 numpy ``[num_samples]``."""
        return self.window_draw(scan_index, draw_seed)[0]

    def window_draw(self, scan_index: int, draw_seed: int) -> tuple[np.ndarray, bool, float]:
        """Item ``(scan_index, draw_seed)``'s frame indices, whether it is mirrored, and its gain."""
        if not 0 <= scan_index < len(self.scans):
            raise IndexError(f"scan index {scan_index} out of range for {len(self.scans)} scans")
        num_frames = self._scan_lengths[scan_index]
        rng = np.random.default_rng(draw_seed)
        span = self.sample_range - 1
        stride = int(rng.integers(1, min(self.max_stride, (num_frames - 1) // span) + 1))
        start = int(rng.integers(0, num_frames - 1 - stride * span + 1))
        offsets = np.sort(rng.choice(self.sample_range, self.num_samples, replace=False))
        indices = start + stride * offsets.astype(np.int64)
        # Drawn even when reverse_prob is 0, so the other draws of a seed never depend on it.
        if rng.random() < self.reverse_prob:
            indices = indices[::-1].copy()
        mirrored = bool(rng.random() < self.flip_prob)
        gain = float(rng.uniform(1.0 - self.gain_jitter, 1.0 + self.gain_jitter))
        return indices, mirrored, gain

    def _scan(self, scan_index: int) -> ScanFile:
        pid = os.getpid()
        if pid != self._owner_pid:
            # Forked (a DataLoader worker): handles inherited from the parent are never read here,
            # since HDF5's state is per process. Dropping them closes only this process's copies.
            self._files, self._poses, self._owner_pid = OrderedDict(), {}, pid
        scan = self._files.get(scan_index)
        if scan is not None:
            self._files.move_to_end(scan_index)
            return scan
        if len(self._files) >= self.max_open_files:
            _, oldest = self._files.popitem(last=False)
            oldest.close()
            if not self._warned_eviction:
                self._warned_eviction = True
                logger.warning(
                    "process %d: %d scans but at most %d open files per dataset (a quarter of the "
                    "open-file limit); files are reopened as needed, which is slower: raise the "
                    "limit (ulimit -n) to keep them all open", os.getpid(), len(self.scans), self.max_open_files,
                )
        scan = ScanFile(self.scans[scan_index])
        if scan_index not in self._poses:
            try:
                self._poses[scan_index] = scan.read_tforms().astype(np.float64)
            except BaseException:
                scan.close()
                raise
        self._files[scan_index] = scan
        return scan

    def __getitem__(self, key):
        if isinstance(key, tuple):
            scan_index, draw_seed = (int(k) for k in key)
        else:
            scan_index = draw_seed = int(key)
        indices, mirrored, gain = self.window_draw(scan_index, draw_seed)
        scan = self._scan(scan_index)
        # Read ascending (a contiguous window is one slice read), then flip a reversed window.
        reverse = indices.size > 1 and indices[0] > indices[-1]
        frames = scan.read_frames(indices[::-1] if reverse else indices)
        if reverse:
            frames = frames[::-1]
        frames = downsample_frames(frames, self.downsample)
        tforms = self._poses[scan_index][indices]
        if mirrored:
            frames = frames[..., ::-1]
            tforms = self.mirror.poses(tforms)
        if gain != 1.0:
            frames = apply_gain(frames, gain)
        frames = np.ascontiguousarray(frames)
        return torch.from_numpy(frames), torch.from_numpy(tforms), scan_index

    def close(self) -> None:
        """Close this process's open files (reopened lazily if the dataset is used again)."""
        if self._owner_pid == os.getpid():
            for scan in self._files.values():
                scan.close()
        self._files, self._poses, self._owner_pid = OrderedDict(), {}, None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_poses"], state["_owner_pid"] = OrderedDict(), {}, None
        return state

    def __enter__(self) -> FrameWindowDataset:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def slice_measurements(measurements, start: int, length: int, num_frames: int):
    """The part of a whole scan's measurements that a window of ``length`` frames from ``start`` holds.

    ``measurements`` is a (nested) dict of tensors indexed along dim 0 by a scan of ``num_frames``
    frames: per frame (``num_frames`` rows) or per pair (a, a + k) by its first frame (``num_frames - k``
    rows, e.g. ``seq_flow``'s ``measure_scan``). Each tensor is cut to its window's rows, the pairs
    inside the window only: rows ``start .. start + length - 1 - k``.
    """
    if isinstance(measurements, dict):
        return {key: slice_measurements(value, start, length, num_frames) for key, value in measurements.items()}
    lag = num_frames - len(measurements)
    return measurements[start:start + length - lag]


class MeasuredWindowDataset(torch.utils.data.Dataset):
    """Windows of a network's cached measurements of whole scans, with their tracker poses.

    For a network whose first stage is fixed (``seq_flow`` with a frozen encoder), what it measures of
    a window's frames is the same at every epoch: measured once per scan (``measure_scan``), a window
    is a slice (``slice_measurements``), and a training step costs only the learned part (hundreds of
    windows a second on a CPU instead of one). Item ``(scan_index, draw_seed)`` draws a start uniform
    in ``0..N - num_samples`` with ``np.random.default_rng(draw_seed)`` and returns
    ``(measurements of the window, tforms float64 [num_samples, 4, 4], scan_index)``, as
    ``FrameWindowDataset`` returns frames. No augmentation: reversed, strided or mirrored windows
    measure differently (the encoder's patches are chosen in the second frame of a pair, and mirrored
    frames choose others), so they would need measuring too.
    """

    def __init__(self, measurements: list, poses: list, num_samples: int):
        if not measurements or len(measurements) != len(poses):
            raise InputError(f"MeasuredWindowDataset: {len(measurements)} measured scans for {len(poses)} pose arrays")
        self.measurements = list(measurements)
        self.poses = [np.asarray(tforms, dtype=np.float64) for tforms in poses]
        self.num_samples = int(num_samples)
        short = [k for k, tforms in enumerate(self.poses) if len(tforms) < self.num_samples]
        if short:
            raise InputError(f"scans {short} have fewer frames than num_samples={self.num_samples}")

    def __len__(self) -> int:
        return len(self.measurements)

    def __getitem__(self, key):
        scan_index, draw_seed = (int(k) for k in key) if isinstance(key, tuple) else (int(key), int(key))
        num_frames = len(self.poses[scan_index])
        start = int(np.random.default_rng(draw_seed).integers(0, num_frames - self.num_samples + 1))
        window = slice_measurements(self.measurements[scan_index], start, self.num_samples, num_frames)
        tforms = torch.from_numpy(self.poses[scan_index][start:start + self.num_samples].copy())
        return window, tforms, scan_index


class EpochSampler(torch.utils.data.Sampler):
    """Items ``(scan_index, draw_seed)`` for ``FrameWindowDataset``: one epoch's list, one rank's share.

    The epoch's list is each scan repeated ``samples_per_scan`` times, permuted (if ``shuffle``)
    and given draw seeds, all from ``np.random.default_rng([seed, epoch])``, so it depends on
    ``(seed, epoch)`` only, never on the rank or the number of ranks. It is padded by wrapping to a
    multiple of ``world_size`` and sliced ``rank::world_size``, as ``DistributedSampler`` does:
    ranks are disjoint and together cover the list. With ``shuffle=False`` (validation) the order
    is scan-major and the windows are the same for the same epoch argument.

    ``set_epoch(epoch)`` selects the epoch (and clears the start); ``set_start(position)`` skips
    this rank's first ``position`` items, to resume mid-epoch.
    """

    def __init__(self, num_scans: int, samples_per_scan: int = 1, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        for name, value, low in (("num_scans", num_scans, 1), ("samples_per_scan", samples_per_scan, 1),
                                 ("world_size", world_size, 1), ("rank", rank, 0)):
            if not _is_int(value) or value < low:
                raise InputError(f"{name}={value!r}: expected an integer >= {low}")
        if rank >= world_size:
            raise InputError(f"rank={rank} must be below world_size={world_size}")
        if not _is_int(seed):
            raise InputError(f"seed={seed!r}: expected an integer")
        self.num_scans = num_scans
        self.samples_per_scan = samples_per_scan
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose list ``__iter__`` yields; resets the start to 0."""
        if not _is_int(epoch) or epoch < 0:
            raise InputError(f"epoch={epoch!r}: expected an integer >= 0")
        self.epoch = epoch
        self.start = 0

    def set_start(self, position: int) -> None:
        """Skip this rank's first ``position`` items of the current epoch (resume mid-epoch)."""
        total = self._rank_size()
        if not _is_int(position) or not 0 <= position <= total:
            raise InputError(f"start position {position!r}: expected an integer in 0..{total} (items on this rank)")
        self.start = position

    def _rank_size(self) -> int:
        total = self.num_scans * self.samples_per_scan
        return -(-total // self.world_size)

    def epoch_items(self) -> list[tuple[int, int]]:
        """The whole epoch's list (before padding and slicing): ``[(scan_index, draw_seed)]``."""
        rng = np.random.default_rng([self.seed, self.epoch])
        scans = np.repeat(np.arange(self.num_scans), self.samples_per_scan)
        if self.shuffle:
            scans = rng.permutation(scans)
        seeds = rng.integers(0, 2**63 - 1, size=scans.size, dtype=np.int64)
        return [(int(s), int(d)) for s, d in zip(scans, seeds)]

    def rank_items(self) -> list[tuple[int, int]]:
        """This rank's items for the current epoch, before ``set_start`` skips any."""
        items = self.epoch_items()
        total = self._rank_size() * self.world_size
        padding = total - len(items)
        if padding:
            items += (items * -(-padding // len(items)))[:padding]
        return items[self.rank:total:self.world_size]

    def __iter__(self):
        return iter(self.rank_items()[self.start:])

    def __len__(self) -> int:
        return self._rank_size() - self.start
