"""Predict whole scans with a trained checkpoint, score them with the TUS-REC metrics, write the results.

Usage::

    python generate_DDF.py --ckpt results/003-fast_cpu/best.pt                      # the test fold
    python generate_DDF.py --ckpt best.pt --split val --plots                         # validation fold, plots
    python generate_DDF.py --ckpt best.pt --data_path ../shared/realdata/plus_bone_l14  # another dataset
    python generate_DDF.py --ckpt best.pt --save_ddfs                                 # also the four DDFs
    python generate_DDF.py --method speckle --data_path data/demo10                   # no network: the floor
    python generate_DDF.py --method speckle --data_path data/demo10 --speckle_sign continuity

For every scan of the split: the checkpoint's network predicts every frame's transform (many
windows per forward pass, the model loaded once), the ground truth comes from the tracker poses, and
GPE, GLE, LPE, LLE (mm), their normalised scores and the runtime (the challenge's: seconds to
predict all positions of the scan) are computed from the transforms, without materialising DDFs;
they equal the official ``cal_dist`` on the four DDF arrays to 1e-4 mm.

The split comes from the checkpoint's folds (``--split test|val|all``); a dataset whose subjects
are not in those folds (another dataset, e.g. the real PLUS scans or the challenge's validation
set in the ``dataset_keys.h5`` layout) is evaluated whole, with a message saying so.

``--method speckle`` replaces the network by classical speckle tracking (``utils.speckle``: patch
correlation in-plane, decorrelation out-of-plane, no learned weights), the floor every learned model
must beat. It needs ``--data_path`` and no checkpoint; the split is the baseline's of that dataset's
subjects (``subject_folds(subjects, 5, 4)``: folds 0-2 train, 3 val, 4 test, as ``train.py`` splits
by default); the decorrelation curve is calibrated on the training folds (the first 300 frames of
each scan, or read from ``--speckle_calibration``) and written into the output folder as
``speckle_calibration.json``.
``--speckle_sign`` chooses how the out-of-plane direction, which decorrelation does not give, is
set (``zero``: not predicted, the default; ``continuity``: kept from pair to pair, reversed at each stop;
``moves``: reversed at a turn, a short stop that the frames on either side confirm, and at the start
of each move the direction moves of its kind started in on the training scans, ``utils.speckle``);
``scores.csv`` then also counts the pairs that truly move out of plane (``oop_moving_pairs``, more
than 0.1 mm RMS over the image), those of them given a direction (``oop_sign_counted``), those given
the right one (``oop_sign_agree``) and the moves of the true motion holding them (``oop_moves``,
``utils.moves``); ``tables.txt`` gives the accuracy with a 95 % interval from resampling whole moves,
since the pairs of one move are not independent trials. Scored exactly
like the network: same tables, files and plots. ``--speckle_oracle`` (with ``--speckle_sign moves``)
is a diagnostic, not a prediction: it gives the rule the true direction of each move's start, each
run or each pair (``utils.speckle_sign.oracle_signs``), to show what each part of the rule costs; its
output folder, log and tables say so.

Output folder (default ``<checkpoint's folder>/generate-<split>[-<dataset>]/``, for the speckle
method ``results/speckle-<dataset>-<split>-<sign rule>[-oracle_<oracle>]/``; a re-run replaces it as a whole, built
beside it and swapped in when complete)::

    scores.csv     one row per scan: errors, identity errors, scores, runtime_s, ddf_s, ...
    summary.csv    mean and std of every figure over all scans, and per protocol (rotation / sweep)
    metrics.h5     the official harness's datasets (GPE, GLE, LPE, LLE, time_elapsed) and ours
    tables.txt     the printed tables;  log.txt  the log
    plots/         --plots: <subject>_<scan>_trajectory.png (frame corners in 3D) and _drift.png
    ddfs/          --save_ddfs: <subject>_<scan>.h5 with the predicted GP, GL, LP, LL (streamed)
    speckle_calibration.json   --method speckle: the decorrelation curve used (readable again)

Scans without landmarks have GLE, LLE and the scores built on them absent (NaN, printed as
``absent``), never zero.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from utils import metrics, moves, speckle, speckle_scan, speckle_sign
from utils.atomic import atomic_path
from utils.calibration import load_calibration
from utils.challenge_data import CALIB_FILE, ScanFile, ScanRef, check_scans, find_scans, read_scan
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.cli import run_cli
from utils.errors import InputError
from utils.evaluation import (
    PredictionSettings,
    ScanResult,
    configure_cpu_inference,
    evaluate_scan,
    format_tables,
    frame_size_warning,
    plot_scan,
    prepare_model_for_inference,
    replaced_folder,
    results_table,
    score_prediction,
    summary_table,
    true_transforms,
    write_metrics_h5,
    write_prediction_ddfs,
)
from utils.training_data import (
    DEFAULT_NUM_FOLDS,
    DEFAULT_SPLIT_SEED,
    TEST_FOLDS,
    TRAIN_FOLDS,
    VAL_FOLDS,
    resolve_data_root,
    scans_of_folds,
    subject_folds,
)

log = logging.getLogger("generate_DDF")

REPO_ROOT = Path(__file__).resolve().parent
SPLITS = ("test", "val", "all")
METHODS = ("network", "speckle")
# Pairs with less true out-of-plane motion than this (RMS over the image, mm) have no direction to get
# right: the speckle method's sign accuracy leaves them out.
SIGN_MIN_RMS_MM = 0.1
# The speckle curve is calibrated on the first frames of each training scan: it needs many patch
# samples, not whole scans (15 s of a 20 fps scan gives ~300 pairs x ~100 patches; a whole 1500-frame
# scan would cost ~1.5 min of matching on 2 cores, ~2.5 h for the 2025 training set).
SPECKLE_CALIBRATION_FRAMES = 300
ORACLE_PARTS = {"move_starts": "move's start (its turns left to the rule)", "runs": "run of moving pairs",
                "pairs": "pair"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=METHODS, default="network",
                        help="network: a checkpoint's pose network (default); speckle: classical speckle tracking, "
                             "no learned weights (needs --data_path, no --ckpt)")
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="--method network (required): checkpoint written by train.py (best.pt / last.pt); "
                             "options and model come from it")
    parser.add_argument("--data_path", type=Path, default=None,
                        help="dataset root in either layout (default: the checkpoint's data_path; required for "
                             "--method speckle)")
    parser.add_argument("--calib_file", type=Path, default=None,
                        help=f"calibration CSV (default: <data_path>/{CALIB_FILE})")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="scans of the checkpoint's test or validation folds, or every scan found (default: test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder, replaced on re-runs (default: <ckpt folder>/generate-<split>)")
    parser.add_argument("--save_ddfs", action="store_true",
                        help="write each scan's four predicted DDFs to out/ddfs/ (streamed, constant memory; "
                             "~12 GB for a 1500-frame 480x640 scan)")
    parser.add_argument("--ddf_format", choices=("h5", "npy"), default="h5",
                        help="--save_ddfs: one HDF5 file per scan (default), or a folder of GP/GL/LP/LL .npy files")
    parser.add_argument("--plots", action="store_true",
                        help="per scan: 3D plot of true and predicted frame corners, and the drift curve (PNG)")
    parser.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="windows per forward pass (default: tuned per device and frame size)")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="CPU threads for the network (default: torch's, one per core)")
    parser.add_argument("--speckle_calibration", type=Path, default=None,
                        help="--method speckle: a speckle_calibration.json to use instead of calibrating the "
                             "decorrelation curve on the dataset's training folds")
    parser.add_argument("--speckle_sign", choices=speckle.SIGN_RULES, default=speckle.SIGN_ZERO,
                        help="--method speckle: out-of-plane direction rule; zero (default) predicts no "
                             "out-of-plane motion, continuity keeps the direction and reverses it after each stop, "
                             "moves reverses it at turns and starts each move the way training moves of its kind did")
    parser.add_argument("--speckle_oracle", choices=speckle_sign.ORACLES, default=None,
                        help="--method speckle --speckle_sign moves, a diagnostic (it reads the true motion): give "
                             "the rule the true direction of each move's start, each run or each pair")
    return parser


# --------------------------------------------------------------------------------------------
# What to evaluate
# --------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use cpu or auto")
    return device


def checkpoint_data_root(options: dict) -> Path:
    """The checkpoint's ``data_path`` as a dataset root: as given (relative to the working folder),
    else relative to the repository."""
    given = options.get("data_path")
    if not given:
        raise InputError("the checkpoint's options hold no data_path; pass --data_path")
    path = Path(given)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    return resolve_data_root(path)


def select_scans(refs: list[ScanRef], checkpoint: dict, split: str, same_root: bool = True) -> tuple[list[ScanRef], str]:
    """The scans of ``split`` and the split actually used.

    ``test`` / ``val`` take the subjects of the checkpoint's ``test_folds`` / ``val_folds`` (fold ids
    into ``checkpoint["folds"]``). The folds apply to the checkpoint's own dataset: ``same_root``
    (the data root is the checkpoint's ``data_path``) or a dataset with exactly the folds' subjects
    (a copy elsewhere). Any other dataset (e.g. the real PLUS scans, or the challenge's validation
    set), or a checkpoint without folds, is evaluated whole: the split becomes ``all``, with a log
    message.
    """
    if split not in SPLITS:
        raise InputError(f"split={split!r} is not one of {list(SPLITS)}")
    if split == "all":
        return list(refs), "all"
    folds = checkpoint.get("folds")
    if not folds:
        log.info("the checkpoint records no folds: evaluating all %d scans instead of the %s split", len(refs), split)
        return list(refs), "all"
    fold_subjects = {int(subject) for fold in folds for subject in fold}
    data_subjects = {ref.subject for ref in refs}
    if not same_root and data_subjects != fold_subjects:
        log.info("this dataset (subjects %s) is not the one the checkpoint's folds split: evaluating all %d scans "
                 "instead of the %s split", _short(sorted(data_subjects)), len(refs), split)
        return list(refs), "all"
    fold_ids = checkpoint["options"].get(f"{split}_folds")
    if not fold_ids:
        raise InputError(f"--split {split}: the checkpoint's options have no {split}_folds; "
                         f"use --split {'val' if split == 'test' else 'test'} or --split all")
    selected = scans_of_folds(refs, folds, fold_ids)
    if not selected:
        raise InputError(f"--split {split}: folds {fold_ids} hold no scans of this dataset")
    return selected, split


def _short(values, shown: int = 8) -> str:
    text = ", ".join(map(str, values[:shown]))
    return f"[{text}{', ...' if len(values) > shown else ''}]"


def default_out_dir(ckpt: Path, split: str, data_root: Path, same_root: bool) -> Path:
    """``<ckpt folder>/generate-<split>``, with ``-<dataset folder name>`` when the data is not the
    checkpoint's own dataset (so evaluating another dataset does not replace these results)."""
    name = f"generate-{split}" if same_root else f"generate-{split}-{Path(data_root).resolve().name}"
    return Path(ckpt).resolve().parent / name


def check_free_space_for_ddfs(sizes: dict, out_dir: Path) -> None:
    """Raise OSError(ENOSPC) naming the folder when ``--save_ddfs`` cannot fit the predicted DDFs.

    ``sizes``: ``{key: (N, H, W)}`` of the scans. GP and LP are float32 [N-1, 3, H*W] each (12 GB
    for a 1500-frame 480x640 scan); landmark fields and HDF5 headers are small beside them, so 1 %
    is added for them. Checked before any work: the disk may still fill during the run (another
    process), which then fails with the same error and leaves no partial result.
    """
    needed = sum(int(2 * (n - 1) * 3 * h * w * 4 * 1.01) for n, h, w in sizes.values())
    existing = Path(out_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"--save_ddfs needs {needed / 1e9:.2f} GB for the DDFs of {len(sizes)} scan(s), "
                      f"{free / 1e9:.2f} GB are free there (drop --save_ddfs, or choose another --out)", str(existing))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)


def _eta(done: int, total: int, elapsed: float) -> str:
    if done == 0:
        return "?"
    seconds = elapsed / done * (total - done)
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def check_method_arguments(args) -> None:
    """Raise ValueError naming the flag unless the flags fit ``--method``."""
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch_size {args.batch_size}: expected a positive integer")
    if args.method == "network":
        if args.ckpt is None:
            raise InputError("--method network needs --ckpt (a checkpoint written by train.py); "
                             "use --method speckle --data_path DATA for the method without learned weights")
        given = [flag for flag, value in (("--speckle_calibration", args.speckle_calibration),
                                          ("--speckle_sign", args.speckle_sign != speckle.SIGN_ZERO),
                                          ("--speckle_oracle", args.speckle_oracle)) if value]
        if given:
            raise InputError(f"{', '.join(given)} only apply to --method speckle")
        return
    if args.data_path is None:
        raise InputError("--method speckle needs --data_path, the dataset root whose scans it predicts "
                         "(and whose training folds calibrate it)")
    given = [flag for flag, value in (("--ckpt", args.ckpt), ("--batch_size", args.batch_size)) if value is not None]
    if given:
        raise InputError(f"{', '.join(given)} only apply to --method network")
    if args.device not in ("auto", "cpu"):
        raise InputError(f"--device {args.device}: --method speckle runs on the CPU; use --device cpu or auto")
    if args.speckle_oracle is not None and args.speckle_sign != speckle.SIGN_MOVES:
        raise InputError(f"--speckle_oracle {args.speckle_oracle} corrects the {speckle.SIGN_MOVES!r} sign rule; "
                         f"add --speckle_sign {speckle.SIGN_MOVES} (got {args.speckle_sign!r})")


def main(argv=None) -> tuple[Path, pd.DataFrame]:
    """Run the evaluation; returns ``(output folder, summary table)`` (``utils.evaluation.summary_table``)."""
    args = get_args_parser().parse_args(argv)
    _setup_logging()
    check_method_arguments(args)
    if args.method == "speckle":
        return main_speckle(args)
    device = resolve_device(args.device)
    if device.type == "cpu":
        configure_cpu_inference(args.num_threads)
    elif args.num_threads is not None:
        torch.set_num_threads(args.num_threads)

    checkpoint = load_checkpoint(args.ckpt)
    options = checkpoint["options"]
    settings = PredictionSettings.from_options(options, batch_size=args.batch_size)
    checkpoint_root = None
    try:
        checkpoint_root = checkpoint_data_root(options)
    except (FileNotFoundError, ValueError) as error:
        if args.data_path is None:
            raise FileNotFoundError(f"{args.ckpt}: its data_path does not lead to a dataset ({error}); "
                                    "pass --data_path") from None
    data_root = resolve_data_root(args.data_path) if args.data_path is not None else checkpoint_root
    calibration = load_calibration(args.calib_file or data_root / CALIB_FILE)
    same_root = checkpoint_root is not None and data_root.resolve() == checkpoint_root.resolve()
    refs, split = select_scans(find_scans(data_root), checkpoint, args.split, same_root)
    sizes = check_scans(refs)  # a damaged or short scan fails now, not after minutes of work on the others
    out_dir = Path(args.out) if args.out is not None else default_out_dir(args.ckpt, split, data_root, same_root)
    if args.save_ddfs:
        check_free_space_for_ddfs(sizes, out_dir)
    model = prepare_model_for_inference(model_from_checkpoint(checkpoint, device), device)
    for height, width in sorted({(h, w) for _, h, w in sizes.values()}):
        message = frame_size_warning(model, checkpoint.get("frame_size"), height, width)
        if message is not None:
            log.warning("%s (%s)", message, args.ckpt)
    model_name = checkpoint["model_args"].get("name")
    del checkpoint  # the optimiser state is not needed and can be as large as the model
    interactive = sys.stderr.isatty()

    def evaluate(ref: ScanRef):
        # evaluate_scan raises on a non-finite prediction before anything of the scan is written.
        result = evaluate_scan(model, settings, ref, calibration, device, progress=interactive)
        add_sign_columns(result, np.array(calibration.scale))
        return result

    with replaced_folder(out_dir) as staging, _log_to(staging / "log.txt"):
        log.info("checkpoint %s: %s, PRED_TYPE=%s, NUM_SAMPLES=%d, NUM_PRED=%d, downsample=%d", args.ckpt,
                 model_name, settings.pred_type, settings.num_samples, settings.num_pred, settings.downsample)
        log.info("data %s: %d scans (%s split) on %s (%d CPU threads) -> %s", data_root, len(refs), split,
                 device, torch.get_num_threads(), out_dir)
        results = _evaluate_all(evaluate, refs, staging, np.array(calibration.scale), args)
        table, summary, text = _write_tables(staging, results, attrs={
            "checkpoint": str(Path(args.ckpt).resolve()), "data_path": str(data_root), "split": split,
            "device": str(device), "model": model_name, "pred_type": settings.pred_type,
            "num_samples": settings.num_samples, "num_pred": settings.num_pred,
            "downsample": settings.downsample})
        text += sign_report(table, results, f"{model_name} checkpoint's")
        _write_text(staging / "tables.txt", text)
    _print_report(out_dir, table, text, args)
    return out_dir, summary


# --------------------------------------------------------------------------------------------
# --method speckle
# --------------------------------------------------------------------------------------------


def speckle_split(refs: list[ScanRef], split: str, calibrated: bool = False) -> tuple[list[ScanRef], list[ScanRef]]:
    """``(training scans, scans of split)`` under the baseline's split of the dataset's own subjects.

    ``subject_folds(sorted subjects, 5, 4)``: folds 0-2 train, 3 validation, 4 test, the split
    ``train.py`` makes with its default options. ``all`` is every scan (the training ones included);
    with a calibration already made (``calibrated``, e.g. on another dataset's training folds) it
    needs no split, so a held-out dataset of any number of subjects is scored whole.
    Raises ValueError (from ``subject_folds``) for a dataset of fewer than 5 subjects otherwise.
    """
    if split not in SPLITS:
        raise InputError(f"split={split!r} is not one of {list(SPLITS)}")
    if split == "all" and calibrated:
        return [], list(refs)
    subjects = sorted({ref.subject for ref in refs})
    try:
        folds = subject_folds(subjects, DEFAULT_NUM_FOLDS, DEFAULT_SPLIT_SEED)
    except ValueError as error:
        raise InputError(f"--method speckle splits the dataset's subjects like train.py: {error}") from None
    train = scans_of_folds(refs, folds, TRAIN_FOLDS)
    if split == "all":
        return train, list(refs)
    return train, scans_of_folds(refs, folds, TEST_FOLDS if split == "test" else VAL_FOLDS)


def default_speckle_out_dir(data_root: Path, split: str, sign_rule: str, oracle: str | None = None) -> Path:
    """``<repository>/results/speckle-<dataset folder name>-<split>-<sign rule>[-oracle_<oracle>]``."""
    suffix = "" if oracle is None else f"-oracle_{oracle}"
    return REPO_ROOT / "results" / f"speckle-{Path(data_root).resolve().name}-{split}-{sign_rule}{suffix}"


def main_speckle(args) -> tuple[Path, pd.DataFrame]:
    """``--method speckle``: calibrate (or read) the decorrelation curve, predict and score the split."""
    data_root = resolve_data_root(args.data_path)
    calibration = load_calibration(args.calib_file or data_root / CALIB_FILE)
    curve = None
    if args.speckle_calibration is not None:
        curve = speckle.SpeckleCalibration.load(args.speckle_calibration)  # fails before any work
        curve.check_pixel_size(calibration.scale)
        curve.check_rule(args.speckle_sign)
    train, refs = speckle_split(find_scans(data_root), args.split, calibrated=curve is not None)
    sizes = check_scans(list(dict.fromkeys(train + refs)))  # before any work, as for the network
    out_dir = Path(args.out) if args.out is not None else \
        default_speckle_out_dir(data_root, args.split, args.speckle_sign, args.speckle_oracle)
    if args.save_ddfs:
        check_free_space_for_ddfs({ref.key: sizes[ref.key] for ref in refs}, out_dir)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    scale = np.array(calibration.scale)

    def evaluate(ref: ScanRef):
        scan = read_scan(ref)
        true_local = None if args.speckle_oracle is None else true_transforms(scan.tforms, calibration)[1]
        global_pred, local_pred, seconds = speckle_scan.predict_scan_speckle(scan.frames, scale, curve, args.speckle_sign,
                                                                        args.speckle_oracle, true_local)
        result = score_prediction(ref, scan, calibration, global_pred, local_pred, seconds)
        add_sign_columns(result, scale)
        return result

    with replaced_folder(out_dir) as staging, _log_to(staging / "log.txt"):
        if curve is None:
            log.info("calibrating the speckle decorrelation curve on the %d scans of the training folds %s",
                     len(train), list(TRAIN_FOLDS))
            started = time.perf_counter()
            curve = speckle_scan.calibrate(
                _first_frames(train, SPECKLE_CALIBRATION_FRAMES), scale, calibration.calib_R_T, poses=_poses(train),
                source=f"{data_root}: training folds {list(TRAIN_FOLDS)} of subject_folds(subjects, "
                       f"{DEFAULT_NUM_FOLDS}, {DEFAULT_SPLIT_SEED}), {len(train)} scans, at most "
                       f"{SPECKLE_CALIBRATION_FRAMES} first frames each")
            log.info("calibrated in %.1f s", time.perf_counter() - started)
        curve.save(staging / speckle.CALIBRATION_FILE)
        log.info("speckle: depth bands %s mm, sigma %s mm, rho0 %s, stop threshold %.3f mm, initial sign %+d, %s",
                 _numbers(curve.band_edges_mm, 0), _numbers(curve.sigma_mm, 2), _numbers(curve.rho0, 3),
                 curve.stop_threshold_mm, curve.initial_sign, _moves_settings(curve))
        log.info("data %s: %d scans (%s split), sign rule %s, %d CPU threads -> %s", data_root, len(refs),
                 args.split, args.speckle_sign, torch.get_num_threads(), out_dir)
        oracle_line = "" if args.speckle_oracle is None else (
            f"ORACLE {args.speckle_oracle}: the {speckle.SIGN_MOVES!r} rule was given the true direction of each "
            f"{ORACLE_PARTS[args.speckle_oracle]}; a diagnostic that reads the true motion, not a prediction\n")
        if oracle_line:
            log.warning(oracle_line.strip())
        results = _evaluate_all(evaluate, refs, staging, scale, args)
        table, summary, text = _write_tables(staging, results, attrs={
            "method": "speckle", "data_path": str(data_root), "split": args.split, "device": "cpu",
            "sign_rule": args.speckle_sign, "speckle_calibration": str(args.speckle_calibration or ""),
            "speckle_oracle": args.speckle_oracle or ""})
        text = oracle_line + text + sign_report(table, results, f"{args.speckle_sign!r} rule's")
        _write_text(staging / "tables.txt", text)
    _print_report(out_dir, table, text, args)
    return out_dir, summary


def add_sign_columns(result: ScanResult, scale) -> None:
    """Count the scan's pairs by out-of-plane direction into ``scores.csv``: those that truly move out of
    plane (``oop_moving_pairs``, more than ``SIGN_MIN_RMS_MM`` RMS over the image), those of them given
    a direction (``oop_sign_counted``) and those given the right one (``oop_sign_agree``), and the moves
    of the true motion with a pair given a direction (``oop_moves``); keep the counts per move."""
    agree, counted, moving = speckle_sign.out_of_plane_sign_pairs(
        result.local_pred, result.local_true, scale, *result.frame_size, min_rms_mm=SIGN_MIN_RMS_MM)
    result.move_sign_counts = moves.counts_per_segment(moves.move_segments(result.local_true), agree, counted)
    result.extra_columns.update(oop_sign_agree=int(agree.sum()), oop_sign_counted=int(counted.sum()),
                                oop_moving_pairs=int(moving.sum()),
                                oop_moves=int((result.move_sign_counts[:, 1] > 0).sum()))


def sign_report(table: pd.DataFrame, results: list, whose: str) -> str:
    """The report's line on the out-of-plane sign accuracy over every scan of ``table``, with its interval
    from resampling whole moves (pairs within a move are not independent trials)."""
    agree, counted, moving, num_moves = (int(table[name].sum()) for name in
                                         ("oop_sign_agree", "oop_sign_counted", "oop_moving_pairs", "oop_moves"))
    if counted:
        per_move = np.concatenate([result.move_sign_counts for result in results])
        low, high = moves.sign_accuracy_interval(per_move[:, 0], per_move[:, 1])
        accuracy = (f"{agree / counted:.3f} ({agree} of the {counted} pairs given a direction; "
                    f"{moves.INTERVAL_CONFIDENCE * 100:g} % interval {low:.3f}-{high:.3f} from resampling the "
                    f"{num_moves} moves holding them)")
    else:
        accuracy = "not defined: no direction is predicted"
    return (f"\n\nOut-of-plane sign accuracy of the {whose} prediction: {accuracy}; among the {moving} pairs with "
            f"more than {SIGN_MIN_RMS_MM} mm RMS true out-of-plane motion over the image")


def _first_frames(refs: list[ScanRef], count: int):
    """Yield ``(frames uint8 [n, H, W], tforms [n, 4, 4])`` of the first ``n <= count`` frames of each scan."""
    for ref in refs:
        with ScanFile(ref) as scan_file:
            stop = min(count, scan_file.num_frames)
            yield scan_file.read_frames(slice(0, stop)), scan_file.read_tforms()[:stop]


def _poses(refs: list[ScanRef]):
    """Yield the whole tracker poses [N, 4, 4] of each scan (no frames are read)."""
    for ref in refs:
        with ScanFile(ref) as scan_file:
            yield scan_file.read_tforms()


def _moves_settings(curve: speckle.SpeckleCalibration) -> str:
    """The ``moves`` rule's calibrated settings, for the log."""
    if not curve.pause_pairs:
        return "no moves calibration"
    quarter_turn = (f"quarter turns sized to {curve.quarter_turn_deg:.1f} deg" if curve.quarter_turn_deg else
                    "quarter turns as measured (none in the training scans)")
    return (f"turns of {curve.turn_pairs}-{curve.pause_pairs - 1} stopped pairs, runs of {curve.min_run_pairs}+ pairs, "
            f"rocks above {curve.rock_deg:g} deg per pair, move directions "
            f"{dict(zip(speckle.MOVE_KINDS, curve.move_signs))}, {quarter_turn}")


def _numbers(values, digits: int) -> str:
    return "[" + ", ".join(f"{value:.{digits}f}" for value in values) + "]"


# --------------------------------------------------------------------------------------------
# Shared by both methods
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _log_to(path: Path):
    """Also log to ``path`` while the block runs."""
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(file_handler)
    try:
        yield
    finally:
        log.removeHandler(file_handler)
        file_handler.close()


def _write_tables(staging: Path, results: list, attrs: dict) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """scores.csv, summary.csv, metrics.h5 and tables.txt into ``staging``; returns (table, summary, text)."""
    table = results_table(results)
    summary = summary_table(table)
    metrics.write_csv(table, staging / "scores.csv")
    metrics.write_csv(summary, staging / "summary.csv", index=True)
    write_metrics_h5(staging / "metrics.h5", table, results, attrs=attrs)
    text = format_tables(table, summary)
    _write_text(staging / "tables.txt", text)
    return table, summary, text


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:  # also names the file if the disk is full
        tmp.write_text(text + "\n", encoding="utf-8")


def _print_report(out_dir: Path, table: pd.DataFrame, text: str, args) -> None:
    print("\n" + text)
    if table["GLE"].isna().any():
        print("(landmark errors and the scores built on them are absent where a scan has no landmarks)")
    still = [record["key"] for record in table.to_dict("records") if metrics.without_motion(
        {name: record[name + metrics.IDENTITY_SUFFIX] for name in metrics.ERROR_NAMES})]
    if still:
        print(f"(scores are undefined for the {len(still)} scan(s) whose probe does not move: {_short(still)})")
    print(f"\nResults: {out_dir} (scores.csv, summary.csv, metrics.h5)"
          + (f"; plots: {out_dir / 'plots'}" if args.plots else "")
          + (f"; DDFs: {out_dir / 'ddfs'}" if args.save_ddfs else ""))


def _evaluate_all(evaluate, refs, staging: Path, scale, args) -> list:
    """``evaluate(ref) -> ScanResult`` for every scan, then its DDFs and plots into ``staging`` as asked."""
    results = []
    started = time.perf_counter()
    with logging_redirect_tqdm():
        for index, ref in enumerate(tqdm(refs, desc="scans", unit="scan", disable=None)):
            result = evaluate(ref)
            if args.save_ddfs:
                suffix = ".h5" if args.ddf_format == "h5" else ""
                write_prediction_ddfs(result, scale, staging / "ddfs" / f"{result.stem}{suffix}", fmt=args.ddf_format)
            if args.plots:
                plot_scan(result, scale, staging / "plots")
            results.append(result)
            if metrics.without_motion(result.identity_errors):
                log.warning("%s: the probe does not move (no-motion GPE %.2g mm): its normalised scores are "
                            "undefined (NaN in scores.csv), and so are the means over a group holding it", ref.key,
                            result.identity_errors["GPE"])
            errors, scores = result.errors, result.scores
            log.info("[%d/%d] %s: %d frames, GPE %.3f GLE %s LPE %.3f LLE %s mm, final %s, %.2f s (%.1f frames/s)%s, "
                     "ETA %s", index + 1, len(refs), ref.key, result.num_frames, errors["GPE"], _mm(errors["GLE"]),
                     errors["LPE"], _mm(errors["LLE"]), _mm(scores["final"]), result.runtime_s,
                     (result.num_frames - 1) / max(result.runtime_s, 1e-9),
                     f", DDFs {result.ddf_s:.2f} s" if not math.isnan(result.ddf_s) else "",
                     _eta(index + 1, len(refs), time.perf_counter() - started))
    return results


def _mm(value: float) -> str:
    return "absent" if math.isnan(value) else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(run_cli(main))
