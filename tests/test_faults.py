"""Faults and bad input (issue 10): a full disk, damaged files, killed runs, signals and user errors
end in one clear line and a non-zero exit, leave no half-written output, and lose no result.

Full disks are simulated by a write that raises ENOSPC (no root needed); killed runs by a child
process that SIGKILLs itself or gets SIGTERM from the test.
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import generate_DDF
import train
from simulation.dataset import generate_dataset
from test_generate import write_checkpoint  # noqa: F401  (registers the test doubles)
from utils import atomic, metrics
from utils.challenge_data import check_scans, find_scans
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.cli import Interrupted, StopSignals, run_cli
from utils.errors import InputError
from utils.evaluation import format_tables, frame_size_warning, replaced_folder, summary_table

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """4 subjects x 2 rotation scans x 24 frames of 120x160, with landmarks."""
    root = tmp_path_factory.mktemp("faults_tiny")
    generate_dataset(root, "tiny", seed=5, subjects=4)
    return root


def copy_of(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    return copy


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--DATA_PATH", str(data), "--out_dir", str(out), "--device", "cpu", "--num_workers", "0",
            "--num_folds", "4", "--train_folds", "0,1", "--val_folds", "2", "--test_folds", "3", "--downsample", "2",
            "--MINIBATCH_SIZE", "4", "--samples_per_scan", "2", "--val_samples_per_scan", "2", "--val_scan_every", "0",
            "--model_name", "efficientnet_b1", *extra]


def run_script(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def error_lines(stderr: str) -> list[str]:
    """stderr without library warnings (torch, tensorboard): what the user reads."""
    return [line for line in stderr.splitlines() if line.strip() and "Warning" not in line
            and not line.startswith("  warnings.warn")]


class FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left: writes beyond it raise ENOSPC."""

    room = 4096

    def write(self, data) -> int:
        if self.tell() + len(memoryview(data).cast("B")) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


# --------------------------------------------------------------------------------------------
# 1, 8: a full disk
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["data", "close"])
def test_hdf5_on_a_full_disk_raises_enospc_naming_the_file_and_exits_cleanly(tmp_path, where):
    # HDF5 cannot close a file after a failed write and crashes the interpreter (exit 139), at the
    # latest at exit: run in a child so a crash is seen as one. The disk fills while the chunks are
    # written ("data"), or only when the file's structures are flushed at close ("close").
    room = 100_000 if where == "data" else 50 * 3 * 19200 * 4 + 2000
    code = textwrap.dedent(f"""
        import errno, io, os, sys
        import numpy as np
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from utils import hdf5_writing
        class FullDisk(io.FileIO):
            def write(self, data):
                if self.tell() + memoryview(data).nbytes > {room}:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return super().write(data)
        hdf5_writing.open = lambda path, mode, buffering: FullDisk(path, "w+")
        path = {str(tmp_path / "fields.h5")!r}
        try:
            with hdf5_writing.writing_hdf5(path) as handle:
                dataset = handle.create_dataset("GP", shape=(50, 3, 19200), dtype=np.float32, chunks=(1, 3, 19200))
                for i in range(50):
                    dataset[i] = np.ones((3, 19200), np.float32)
        except OSError as error:
            assert error.errno == errno.ENOSPC and error.filename == path, (error.errno, error.filename)
            print("ENOSPC", error.filename)
        else:
            raise AssertionError("no error on a full disk")
    """)
    result = run_script("-c", code, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.startswith("ENOSPC") and "Traceback" not in result.stderr


def test_hdf5_space_is_reserved_before_writing(tmp_path, monkeypatch):
    from utils import hdf5_writing

    asked = []

    def no_room(handle, size, path):
        asked.append(size)
        raise OSError(errno.ENOSPC, "No space left on device: 1.00 GB are needed for this file", str(path))

    monkeypatch.setattr(hdf5_writing, "reserve_space", no_room)
    path = tmp_path / "fields.h5"
    with pytest.raises(OSError, match="1.00 GB are needed"), hdf5_writing.writing_hdf5(path, reserve=10**6) as handle:
        handle.create_dataset("GP", data=np.zeros(10))
        raise AssertionError("nothing is written when the space is not there")
    assert asked and asked[0] >= 10**6
    # And on this machine's real file system the reservation succeeds and the file keeps its size.
    monkeypatch.undo()
    with hdf5_writing.writing_hdf5(path, reserve=8 * 10**5) as handle:
        handle.create_dataset("GP", data=np.arange(10**5, dtype=np.float64))
    with h5py.File(path, "r") as handle:
        assert handle["GP"][-1] == 10**5 - 1
    assert path.stat().st_size < 8 * 10**5 + 50_000


def test_generate_refuses_save_ddfs_that_cannot_fit_before_any_output(tiny, tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "run" / "last.pt", tiny, folds=((0, 1), (2, 3)), test_folds=(1,))
    free = 10**7  # each test scan's GP and LP need 2 x 23 x 3 x 120 x 160 x 4 bytes = 10.6 MB; 4 scans 42 MB
    monkeypatch.setattr(generate_DDF.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(free, 0, free))
    with pytest.raises(OSError, match=r"needs 0\.04 GB for the DDFs of 4 scan\(s\), 0\.01 GB are free") as caught:
        generate_DDF.main(["--ckpt", str(ckpt), "--save_ddfs", "--out", str(tmp_path / "out")])
    assert caught.value.errno == errno.ENOSPC
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_table_on_a_full_disk_names_its_file(tmp_path):
    path = tmp_path / "scores.csv"

    def write(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as pandas' to_csv raises it: no file name

    with pytest.raises(OSError) as caught, atomic.atomic_path(path) as tmp:
        write(tmp)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_save_on_a_full_disk_names_the_disk_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import utils.checkpoint as checkpoint_module

    path = write_checkpoint(tmp_path / "last.pt", tmp_path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoint_module, "open", lambda name, mode: FullDisk(name, "w"), raising=False)
    with pytest.raises(OSError, match="No space left on device while saving a checkpoint") as caught:
        save_checkpoint(path, load_checkpoint(path))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# --------------------------------------------------------------------------------------------
# 3: a scan without motion
# --------------------------------------------------------------------------------------------


def test_a_scan_without_motion_has_undefined_scores_never_huge_ones():
    errors = {"GPE": 2.0, "GLE": 1.5, "LPE": 0.3, "LLE": 0.2}
    still = {name: 4e-14 for name in errors}  # float noise of T0^-1 Ti for equal poses
    scores = metrics.normalised_scores(errors, still)
    assert all(math.isnan(value) for value in scores.values())
    assert metrics.without_motion(still)
    moving = {"GPE": 10.0, "GLE": 8.0, "LPE": 0.5, "LLE": 0.4}
    assert not metrics.without_motion(moving)
    assert metrics.normalised_scores(errors, moving)["GPE*"] == pytest.approx(1 - 2.0 / 10.0)
    table = metrics.results_table([metrics.scan_row("000", "still", errors, still, 1.0, key="sub000__still"),
                           metrics.scan_row("000", "moving", errors, moving, 1.0, key="sub000__moving")])
    text = format_tables(table, summary_table(table))
    lines = {line.split()[1]: line for line in text.splitlines()[2:4]}
    assert "undefined" in lines["still"] and "undefined" not in lines["moving"]


# --------------------------------------------------------------------------------------------
# 4, 5, 13: the dataset
# --------------------------------------------------------------------------------------------


def test_two_folders_of_one_subject_are_refused(tiny, tmp_path):
    data = copy_of(tiny, tmp_path)
    shutil.copytree(data / "frames_transfs" / "001", data / "frames_transfs" / "1")
    with pytest.raises(InputError, match=r"subject 1 appears as folders \['001', '1'\]"):
        find_scans(data)


@pytest.mark.parametrize("damage", ["truncated scan", "text scan", "text landmarks", "text dataset keys"])
def test_unreadable_hdf5_names_the_file(tiny, tmp_path, damage):
    data = copy_of(tiny, tmp_path)
    scan = data / "frames_transfs" / "003" / "RH_rotation.h5"
    if damage == "truncated scan":
        scan.write_bytes(scan.read_bytes()[:5000])
        bad, match = scan, "not a readable HDF5 file.*truncated"
    elif damage == "text scan":
        scan.write_text("not HDF5")
        bad, match = scan, "not a readable HDF5 file.*expected a scan file"
    elif damage == "text landmarks":
        bad = data / "landmarks" / "landmark_003.h5"
        bad.write_text("not HDF5")
        match = "not a readable HDF5 file.*expected a landmark file"
    else:
        generate_dataset(tmp_path / "test_layout", "tiny", seed=1, layout="test", subjects=1)
        data = tmp_path / "test_layout"
        bad = data / "dataset_keys.h5"
        bad.write_text("not HDF5")
        match = "not a readable HDF5 file.*expected a dataset keys file"
        with pytest.raises(InputError, match=match):
            find_scans(data)
        return
    with pytest.raises(InputError, match=rf"{bad}: {match}"):
        check_scans(find_scans(data))


def test_generate_checks_every_scan_before_any_work(tiny, tmp_path):
    data = copy_of(tiny, tmp_path)
    last = data / "frames_transfs" / "003" / "RH_rotation.h5"  # the last scan evaluated
    last.write_bytes(last.read_bytes()[:5000])
    ckpt = write_checkpoint(tmp_path / "run" / "last.pt", data, folds=((0, 1), (2, 3)), test_folds=(1,))
    started = time.perf_counter()
    with pytest.raises(InputError, match=str(last)):
        generate_DDF.main(["--ckpt", str(ckpt), "--split", "all", "--out", str(tmp_path / "out")])
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("frames", [0, 1])
def test_a_scan_of_fewer_than_two_frames_is_named(tiny, tmp_path, frames):
    data = copy_of(tiny, tmp_path)
    path = data / "frames_transfs" / "002" / "LH_rotation.h5"
    with h5py.File(path, "r") as handle:
        images, poses = handle["frames"][:frames], handle["tforms"][:frames]
    with h5py.File(path, "w") as handle:
        handle["frames"], handle["tforms"] = images, poses
    with pytest.raises(InputError, match=rf"scan sub002__LH_rotation has {frames} frame\(s\); at least 2 are needed"):
        check_scans(find_scans(data))


# --------------------------------------------------------------------------------------------
# 6, 11: staging folders and temporaries
# --------------------------------------------------------------------------------------------


def test_a_killed_run_s_staging_folder_is_removed_by_the_next_run_and_a_live_one_is_kept(tmp_path):
    out = tmp_path / "result"
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from utils.evaluation import replaced_folder
        with replaced_folder({str(out)!r}) as staging:
            (staging / "big.h5").write_bytes(b"0" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert run_script("-c", code).returncode == -signal.SIGKILL
    (killed,) = tmp_path.glob(".result.*.partial")
    assert (killed / "big.h5").is_file()
    with atomic.locked_temporary_folder(out) as live:  # another run writing the same result now
        with replaced_folder(out) as staging:
            (staging / "scores.csv").write_text("x\n")
        assert live.is_dir()
    assert not killed.exists()
    assert (out / "scores.csv").is_file()
    assert list(tmp_path.glob(".result.*")) == [live]  # its owner removes or renames it


def test_a_killed_writer_s_temporary_file_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "last.pt"
    stale = tmp_path / ".last.pt.abcd1234.partial.pt"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / ".last.pt.old-notes"  # not a temporary of ours
    other.write_text("keep")
    with atomic.atomic_path(path) as tmp:
        tmp.write_text("whole")
    assert path.read_text() == "whole" and not stale.exists() and other.exists()


def test_a_result_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    out = tmp_path / "result"
    aside = tmp_path / ".result.x1.old"
    (aside / "previous").mkdir(parents=True)
    (aside / "previous" / "scores.csv").write_text("previous\n")
    with pytest.raises(RuntimeError):
        with replaced_folder(out):
            assert (out / "scores.csv").read_text() == "previous\n"  # back before any work
            raise RuntimeError("this run fails too")
    assert (out / "scores.csv").read_text() == "previous\n" and not aside.exists()


def test_result_folders_get_the_mode_of_a_plain_mkdir(tmp_path):
    mask = os.umask(0o022)
    try:
        with replaced_folder(tmp_path / "result") as staging:
            (staging / "scores.csv").write_text("x\n")
    finally:
        os.umask(mask)
    assert (tmp_path / "result").stat().st_mode & 0o777 == 0o755


# --------------------------------------------------------------------------------------------
# 7, 10, 12, 14: training runs
# --------------------------------------------------------------------------------------------


def test_resume_after_a_death_between_the_epoch_row_and_the_checkpoint_appends_each_epoch_once(tiny, tmp_path):
    run = train.run(train_args(tiny, tmp_path, "--NUM_EPOCHS", "1", "--name", "r"))
    metrics_csv = run.run_dir / "metrics.csv"
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    # The run that died had appended epoch 2's row; its last.pt is epoch 1's.
    with open(metrics_csv, "a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=list(rows[0])).writerow(dict(rows[-1], epoch="2", step="4"))
    train.run(["--resume", str(run.run_dir), "--NUM_EPOCHS", "2"])  # a run folder stands for its last.pt
    with open(metrics_csv, newline="") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["0", "1", "2"]


def test_resume_refuses_bad_checkpoints_with_their_reason(tiny, tmp_path):
    run = train.run(train_args(tiny, tmp_path, "--NUM_EPOCHS", "1", "--name", "r"))
    checkpoint = torch.load(run.run_dir / "last.pt", weights_only=False)
    shrunk = dict(checkpoint, model={name: value[..., :1] if value.ndim else value
                                     for name, value in checkpoint["model"].items()})
    torch.save(shrunk, run.run_dir / "shrunk.pt")
    with pytest.raises(InputError, match=r"weights in .*shrunk.pt do not fit the model .*shape mismatches"):
        train.run(["--resume", str(run.run_dir / "shrunk.pt")])
    diverged = dict(checkpoint, model={name: value * math.nan if value.is_floating_point() else value
                                       for name, value in checkpoint["model"].items()})
    torch.save(diverged, run.run_dir / "nan.pt")
    with pytest.raises(InputError, match=r"nan.pt: weight '.*' holds NaN or inf"):
        train.run(["--resume", str(run.run_dir / "nan.pt")])
    elsewhere = tmp_path / "copies"
    elsewhere.mkdir()
    shutil.copy(run.run_dir / "last.pt", elsewhere / "last.pt")
    with pytest.raises(InputError, match="not inside a run folder .* use --init_weights"):
        train.run(["--resume", str(elsewhere / "last.pt")])
    assert sorted(p.name for p in elsewhere.iterdir()) == ["last.pt"]
    with pytest.raises(InputError, match="holds no last.pt"):
        train.run(["--resume", str(elsewhere.parent)])


def test_a_training_run_on_bad_data_leaves_no_run_folder(tiny, tmp_path):
    data = copy_of(tiny, tmp_path)
    with h5py.File(data / "frames_transfs" / "002" / "LH_rotation.h5", "r+") as handle:
        handle["tforms"][5, 0, 0] = 3.0
    with pytest.raises(InputError, match="'tforms' frame 5 is not a rigid pose"):
        train.run(train_args(data, tmp_path / "runs", "--NUM_EPOCHS", "1"))
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_run_failing_before_its_first_result_removes_its_folder(tiny, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug while building the network")

    monkeypatch.setattr(train, "build_network", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        train.run(train_args(tiny, tmp_path / "runs", "--NUM_EPOCHS", "1"))
    assert list((tmp_path / "runs").iterdir()) == []


def test_stop_signals_ask_once_then_interrupt():
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_training_saves_last_pt_and_the_run_resumes(tiny, tmp_path, stop_signal):
    args = train_args(tiny, tmp_path / "runs", "--NUM_EPOCHS", "500", "--samples_per_scan", "8", "--num_workers", "1")
    child = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        rows = list((tmp_path / "runs").glob("*/metrics.csv"))
        if rows and rows[0].read_text().count("\n") >= 4:  # header, epochs 0, 1 and 2: training epoch 3
            break
        time.sleep(0.2)
    child.send_signal(stop_signal)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + stop_signal, stderr[-2000:]
    assert error_lines(stderr) == [f"train.py: interrupted ({signal.Signals(stop_signal).name})"]
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = load_checkpoint(run_dir / "last.pt")
    # freq_save (100 epochs) wrote no last.pt yet: this one was saved on the signal, after epoch 2's
    # 2 x 4 steps (4 windows per step) or a step of epoch 3.
    assert saved["step"] >= 2 * 4
    resumed = train.run(["--resume", str(run_dir / "last.pt"), "--max_steps", str(saved["step"] + 1)])
    assert resumed.step == saved["step"] + 1


# --------------------------------------------------------------------------------------------
# 15, 16: the command lines and frame sizes
# --------------------------------------------------------------------------------------------


def test_run_cli_prints_user_errors_as_one_line_and_keeps_tracebacks_for_bugs(capsys):
    def bad_input(argv):
        raise InputError("data/x.h5: 'frames' must be uint8, got float32")

    def missing(argv):
        raise FileNotFoundError("checkpoint file not found: nope.pt")

    def full_disk(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/metrics.h5")

    def bug(argv):
        raise ZeroDivisionError("a bug")

    assert run_cli(bad_input) == 2
    assert run_cli(missing) == 1
    assert run_cli(full_disk) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("error: data/x.h5: 'frames' must be uint8, got float32")
    assert lines[1].endswith("error: checkpoint file not found: nope.pt")
    assert lines[2].endswith("error: out/metrics.h5: No space left on device (free some space or write elsewhere, "
                             "then run again)")
    with pytest.raises(ZeroDivisionError):
        run_cli(bug)


@pytest.mark.parametrize("script, args, message", [
    ("generate_DDF.py", ["--ckpt", "nope.pt"], "generate_DDF.py: error: checkpoint file not found: nope.pt"),
    ("train.py", ["--DATA_PATH", "{missing}", "--out_dir", "{out}"], "train.py: error: data path not found"),
    ("reconstruct.py", ["--data", "{tiny}", "--scan", "000/LH_rotation", "--transforms", "{text}", "--out", "{out}"],
     "reconstruct.py: error: {text}: not a readable HDF5 file"),
    ("generate_DDF.py", ["--method", "speckle", "--data_path", "{tiny}", "--split", "all", "--speckle_calibration",
                         "{text}"], "generate_DDF.py: error: {text}: not a valid JSON speckle calibration"),
])
def test_clis_print_one_line_for_bad_input(tiny, tmp_path, script, args, message):
    text = tmp_path / "x.h5"
    text.write_text("not HDF5, not JSON")
    names = {"missing": tmp_path / "missing", "out": tmp_path / "out", "tiny": tiny, "text": text}
    result = run_script(script, *[arg.format(**names) for arg in args])
    lines = error_lines(result.stderr)
    assert result.returncode in (1, 2) and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(message.format(**names))
    assert not (tmp_path / "out").exists()


def test_frames_of_another_size_than_trained_get_a_warning(tiny, tmp_path, monkeypatch):
    import models
    import predict_ddfs

    efficientnet = models.build_model("efficientnet_b1", 2, 6)
    assert frame_size_warning(efficientnet, [120, 160], 120, 160) is None
    assert frame_size_warning(efficientnet, None, 64, 96) is None  # an older checkpoint: nothing to compare
    assert "trained on 120x160" in frame_size_warning(efficientnet, [120, 160], 64, 96)
    patch_flow = models.build_model("patch_flow", 2, 6, pixel_mm=[0.2, 0.2])
    assert frame_size_warning(patch_flow, [120, 160], 64, 96) is None  # measures pixels of any frame

    checkpoint = load_checkpoint(write_checkpoint(tmp_path / "run" / "last.pt", tiny))
    checkpoint["frame_size"] = [120, 160]
    path = save_checkpoint(tmp_path / "run" / "sized.pt", checkpoint)
    monkeypatch.setenv(predict_ddfs.CHECKPOINT_ENV, str(path))
    predict_ddfs.clear_cache()
    frames = np.random.default_rng(0).integers(0, 255, (4, 64, 96), dtype=np.uint8)
    with pytest.warns(UserWarning, match="frames are 64x96 but the network was trained on 120x160"):
        predict_ddfs.predict_ddfs(frames, None, tiny / "calib_matrix.csv", "cpu")
    predict_ddfs.clear_cache()
