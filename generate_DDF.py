"""Predict whole scans with a trained checkpoint, score them with the TUS-REC metrics, write the results.

Usage::

    python generate_DDF.py --ckpt results/003-fast_cpu/best.pt                      # the test fold
    python generate_DDF.py --ckpt best.pt --split val --plots                         # validation fold, plots
    python generate_DDF.py --ckpt best.pt --data_path ../shared/realdata/plus_bone_l14  # another dataset
    python generate_DDF.py --ckpt best.pt --save_ddfs                                 # also the four DDFs

For every scan of the split: the checkpoint's network predicts every frame's transform (many
windows per forward pass, the model loaded once), the ground truth comes from the tracker poses, and
GPE, GLE, LPE, LLE (mm), their normalised scores and the runtime (the challenge's: seconds to
predict all positions of the scan) are computed from the transforms, without materialising DDFs;
they equal the official ``cal_dist`` on the four DDF arrays to 1e-4 mm.

The split comes from the checkpoint's folds (``--split test|val|all``); a dataset whose subjects
are not in those folds (another dataset, e.g. the real PLUS scans or the challenge's validation
set in the ``dataset_keys.h5`` layout) is evaluated whole, with a message saying so.

Output folder (default ``<checkpoint's folder>/generate-<split>[-<dataset>]/``; a re-run replaces it
as a whole, built beside it and swapped in when complete)::

    scores.csv     one row per scan: errors, identity errors, scores, runtime_s, ddf_s, ...
    summary.csv    mean and std of every figure over all scans, and per protocol (rotation / sweep)
    metrics.h5     the official harness's datasets (GPE, GLE, LPE, LLE, time_elapsed) and ours
    tables.txt     the printed tables;  log.txt  the log
    plots/         --plots: <subject>_<scan>_trajectory.png (frame corners in 3D) and _drift.png
    ddfs/          --save_ddfs: <subject>_<scan>.h5 with the predicted GP, GL, LP, LL (streamed)

Scans without landmarks have GLE, LLE and the scores built on them absent (NaN, printed as
``absent``), never zero.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from utils import metrics
from utils.calibration import load_calibration
from utils.challenge_data import CALIB_FILE, ScanRef, find_scans
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.evaluation import (
    PredictionSettings,
    configure_cpu_inference,
    evaluate_scan,
    format_tables,
    plot_scan,
    prepare_model_for_inference,
    replaced_folder,
    results_table,
    summary_table,
    write_metrics_h5,
    write_prediction_ddfs,
)
from utils.training_data import resolve_data_root, scans_of_folds

log = logging.getLogger("generate_DDF")

REPO_ROOT = Path(__file__).resolve().parent
SPLITS = ("test", "val", "all")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True,
                        help="checkpoint written by train.py (best.pt / last.pt); options and model come from it")
    parser.add_argument("--data_path", type=Path, default=None,
                        help="dataset root in either layout (default: the checkpoint's data_path)")
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
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use cpu or auto")
    return device


def checkpoint_data_root(options: dict) -> Path:
    """The checkpoint's ``data_path`` as a dataset root: as given (relative to the working folder),
    else relative to the repository."""
    given = options.get("data_path")
    if not given:
        raise ValueError("the checkpoint's options hold no data_path; pass --data_path")
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
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
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
        raise ValueError(f"--split {split}: the checkpoint's options have no {split}_folds; "
                         f"use --split {'val' if split == 'test' else 'test'} or --split all")
    selected = scans_of_folds(refs, folds, fold_ids)
    if not selected:
        raise ValueError(f"--split {split}: folds {fold_ids} hold no scans of this dataset")
    return selected, split


def _short(values, shown: int = 8) -> str:
    text = ", ".join(map(str, values[:shown]))
    return f"[{text}{', ...' if len(values) > shown else ''}]"


def default_out_dir(ckpt: Path, split: str, data_root: Path, same_root: bool) -> Path:
    """``<ckpt folder>/generate-<split>``, with ``-<dataset folder name>`` when the data is not the
    checkpoint's own dataset (so evaluating another dataset does not replace these results)."""
    name = f"generate-{split}" if same_root else f"generate-{split}-{Path(data_root).resolve().name}"
    return Path(ckpt).resolve().parent / name


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


def main(argv=None) -> tuple[Path, pd.DataFrame]:
    """Run the evaluation; returns ``(output folder, summary table)`` (``utils.evaluation.summary_table``)."""
    args = get_args_parser().parse_args(argv)
    _setup_logging()
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size}: expected a positive integer")
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
    out_dir = Path(args.out) if args.out is not None else default_out_dir(args.ckpt, split, data_root, same_root)
    model = prepare_model_for_inference(model_from_checkpoint(checkpoint, device), device)
    model_name = checkpoint["model_args"].get("name")
    del checkpoint  # the optimiser state is not needed and can be as large as the model
    scale = np.array(calibration.scale)
    with replaced_folder(out_dir) as staging:
        file_handler = logging.FileHandler(staging / "log.txt", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(file_handler)
        try:
            log.info("checkpoint %s: %s, PRED_TYPE=%s, NUM_SAMPLES=%d, NUM_PRED=%d, downsample=%d", args.ckpt,
                     model_name, settings.pred_type, settings.num_samples, settings.num_pred, settings.downsample)
            log.info("data %s: %d scans (%s split) on %s (%d CPU threads) -> %s", data_root, len(refs), split,
                     device, torch.get_num_threads(), out_dir)
            results = _evaluate_all(model, settings, refs, calibration, device, staging, scale, args)
            table = results_table(results)
            summary = summary_table(table)
            metrics.write_csv(table, staging / "scores.csv")
            metrics.write_csv(summary, staging / "summary.csv", index=True)
            write_metrics_h5(staging / "metrics.h5", table, results, attrs={
                "checkpoint": str(Path(args.ckpt).resolve()), "data_path": str(data_root), "split": split,
                "device": str(device), "model": model_name, "pred_type": settings.pred_type,
                "num_samples": settings.num_samples, "num_pred": settings.num_pred,
                "downsample": settings.downsample})
            text = format_tables(table, summary)
            (staging / "tables.txt").write_text(text + "\n", encoding="utf-8")
        finally:
            log.removeHandler(file_handler)
            file_handler.close()
    print("\n" + text)
    if table["GLE"].isna().any():
        print("(landmark errors and the scores built on them are absent where a scan has no landmarks)")
    print(f"\nResults: {out_dir} (scores.csv, summary.csv, metrics.h5)"
          + (f"; plots: {out_dir / 'plots'}" if args.plots else "")
          + (f"; DDFs: {out_dir / 'ddfs'}" if args.save_ddfs else ""))
    return out_dir, summary


def _evaluate_all(model, settings, refs, calibration, device, staging: Path, scale, args) -> list:
    results = []
    started = time.perf_counter()
    interactive = sys.stderr.isatty()
    with logging_redirect_tqdm():
        for index, ref in enumerate(tqdm(refs, desc="scans", unit="scan", disable=None)):
            # evaluate_scan raises on a non-finite prediction before anything of the scan is written.
            result = evaluate_scan(model, settings, ref, calibration, device, progress=interactive)
            if args.save_ddfs:
                suffix = ".h5" if args.ddf_format == "h5" else ""
                write_prediction_ddfs(result, scale, staging / "ddfs" / f"{result.stem}{suffix}", fmt=args.ddf_format)
            if args.plots:
                plot_scan(result, scale, staging / "plots")
            results.append(result)
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
    main()
