"""The training data pipeline: baseline folds, fold files, windows, down-sampling, cache, sampler, loaders."""

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import utils.training_data as td
from reference import random_tforms
from simulation.dataset import generate_dataset
from utils.calibration import default_calibration, load_calibration
from utils.challenge_data import CALIB_FILE, ScanFile, find_scans, write_dataset_keys, write_scan
from utils.training_data import (
    EpochSampler,
    FrameWindowDataset,
    cache_downsampled_scans,
    downsample_frames,
    downsampled_calibration,
    read_folds,
    read_scan_frames,
    resolve_data_root,
    scan_keys_by_subject,
    scans_of_folds,
    subject_folds,
    write_folds,
)
from utils.transform import relative_transforms


@pytest.fixture(scope="session")
def sim_root(tmp_path_factory):
    """The simulator's tiny preset: 2 subjects x 2 scans x 24 frames of 120 x 160 (train layout)."""
    root = tmp_path_factory.mktemp("sim")
    generate_dataset(root, "tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def sim_scans(sim_root):
    return find_scans(sim_root)


@pytest.fixture(scope="session")
def odd_root(tmp_path_factory):
    """A test-layout dataset of random 37 x 53 frames (sizes no factor divides), scans of 9-13 frames."""
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(7)
    keys = []
    for subject, names in {1: ["LH_rotation", "RH_rotation"], 4: ["LH_rotation"]}.items():
        for k, name in enumerate(names):
            n = 9 + 2 * k + subject
            frames = rng.integers(0, 256, (n, 37, 53), dtype=np.uint8)
            ref = write_scan(root, subject, name, frames, random_tforms(rng, n), layout="test")
            keys.append(ref.key)
    write_dataset_keys(root, keys)
    return root


def baseline_partition(n, num_folds=5, seed=4):
    """The official ``partition_by_ratio(ratios=[1]*num_folds, randomise=True)``, written independently."""
    ratios = [1] * num_folds
    ratios = [ratios[i] / sum(ratios) for i in range(num_folds)]
    set_sizes = [int(n * r) for r in ratios]
    sub_ind = list(range(n))
    for ii in range(n - sum(set_sizes)):
        set_sizes[ii] += 1
    random.Random(seed).shuffle(sub_ind)
    return [sub_ind[sum(set_sizes[:k]):sum(set_sizes[:k + 1])] for k in range(num_folds)]


# --------------------------------------------------------------------------------------------
# Folds
# --------------------------------------------------------------------------------------------


def test_subject_folds_reproduce_the_baseline():
    for n in range(5, 54):
        assert subject_folds(list(range(n))) == baseline_partition(n), n
    for num_folds in (2, 3, 7, 10):
        assert subject_folds(range(23), num_folds=num_folds, seed=11) == baseline_partition(23, num_folds, 11)
    # Positions index the sorted ids, whatever ids the subjects have and in whatever order given.
    ids = [3 * k + 50 for k in range(17)]
    shuffled = ids[::-1]
    assert subject_folds(shuffled) == [[ids[p] for p in fold] for fold in baseline_partition(17)]


def test_subject_folds_properties():
    for n in (5, 6, 12, 50):
        folds = subject_folds(range(100, 100 + n))
        flat = [s for fold in folds for s in fold]
        assert sorted(flat) == list(range(100, 100 + n)) and len(set(flat)) == n
        assert [len(f) for f in folds] == sorted((len(f) for f in folds), reverse=True)
        assert max(map(len, folds)) - min(map(len, folds)) <= 1
        assert subject_folds(range(100, 100 + n)) == folds
    assert subject_folds(range(50), seed=5) != subject_folds(range(50))
    with pytest.raises(ValueError, match=r"4 subject.*5 folds"):
        subject_folds(range(4))
    with pytest.raises(ValueError, match="repeated"):
        subject_folds([1, 2, 2, 3, 4, 5])


def test_folds_json_round_trip(tmp_path, sim_root, sim_scans):
    folds = subject_folds([0, 1], num_folds=2, seed=4)
    path = write_folds(tmp_path / "folds.json", folds, sim_root, 4, scan_keys_by_subject(sim_scans))
    assert read_folds(path) == folds
    record = json.loads(path.read_text())
    assert record["data_root"] == str(sim_root) and record["split_seed"] == 4 and record["num_folds"] == 2
    for k, fold in enumerate(folds):
        assert record["scans"][str(k)] == [f"sub{s:03d}__{n}" for s in sorted(fold) for n in ("LH_rotation", "RH_rotation")]
    assert not list(tmp_path.glob(".*partial*"))  # written through a temporary name
    with pytest.raises(ValueError, match="both fold 0 and fold 1"):
        write_folds(tmp_path / "bad.json", [[1, 2], [2]], sim_root, 4, {})
    assert not (tmp_path / "bad.json").exists()


GOOD = {"data_root": "data", "split_seed": 4, "num_folds": 2, "folds": [[0, 2], [1]], "scans": {"0": [], "1": []}}


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "not a valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "folds"}), r"missing field\(s\) \['folds'\]"),
        (json.dumps({**GOOD, "num_folds": 3}), "'num_folds' is 3 but 'folds' holds 2"),
        (json.dumps({**GOOD, "folds": [[0, 1], [1]]}), "subject 1 is in both fold 0 and fold 1"),
        (json.dumps({**GOOD, "folds": [[0, "2"], [1]]}), r"'folds'\[0\] holds '2'"),
        (json.dumps({**GOOD, "folds": [[0, True], [1]]}), r"'folds'\[0\] holds True"),
        (json.dumps({**GOOD, "folds": [[0, -2], [1]]}), r"'folds'\[0\] holds -2"),
        (json.dumps({**GOOD, "folds": 3}), "'folds' must be"),
        (json.dumps({**GOOD, "split_seed": "4"}), "'split_seed'"),
        (json.dumps({**GOOD, "data_root": 1}), "'data_root'"),
        (json.dumps({**GOOD, "scans": {"0": []}}), "'scans' must map each fold"),
        (json.dumps({**GOOD, "scans": {"0": [1], "1": []}}), r"'scans'\['0'\]"),
    ],
)
def test_read_folds_errors(tmp_path, text, match):
    path = tmp_path / "folds.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as error:
        read_folds(path)
    assert str(path) in str(error.value)


def test_read_folds_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="folds file not found"):
        read_folds(tmp_path / "nope.json")


def test_scans_of_folds(sim_scans):
    folds = [[1], [0]]
    assert [r.key for r in scans_of_folds(sim_scans[::-1], folds, [0])] == ["sub001__LH_rotation", "sub001__RH_rotation"]
    assert scans_of_folds(sim_scans[::-1], folds, [1, 0]) == sim_scans
    with pytest.raises(ValueError, match="fold id 2 is out of range: there are 2 folds"):
        scans_of_folds(sim_scans, folds, [2])
    with pytest.raises(ValueError, match=r"subject\(s\) \[7\]"):
        scans_of_folds(sim_scans, [[0, 7], [1]], [0])


def test_resolve_data_root(sim_root, odd_root, tmp_path):
    assert resolve_data_root(sim_root) == sim_root
    assert resolve_data_root(sim_root / "frames_transfs") == sim_root
    assert resolve_data_root(str(odd_root)) == odd_root
    with pytest.raises(FileNotFoundError, match="not found.*expected a TUS-REC dataset root"):
        resolve_data_root(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a dataset root"):
        resolve_data_root(tmp_path)


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def test_windows(sim_scans):
    dataset = FrameWindowDataset(sim_scans, num_samples=4, sample_range=10)
    assert len(dataset) == 4 and dataset.scan_lengths == [24] * 4 and dataset.frame_size == (120, 160)
    handles = [ScanFile(ref) for ref in sim_scans]
    stored = [h.read_tforms() for h in handles]
    with dataset:
        for seed in range(40):
            scan_index = seed % 4
            frames, tforms, index = dataset[(scan_index, 1000 + seed)]
            indices = dataset.window_indices(scan_index, 1000 + seed)
            assert index == scan_index
            assert frames.dtype == torch.uint8 and frames.shape == (4, 120, 160)
            assert tforms.dtype == torch.float64 and tforms.shape == (4, 4, 4)
            assert np.all(np.diff(indices) > 0) and indices[0] >= 0 and indices[-1] < 24
            assert indices[-1] - indices[0] <= 9
            np.testing.assert_array_equal(frames.numpy(), handles[scan_index].read_frames(indices))
            np.testing.assert_array_equal(tforms.numpy(), stored[scan_index][indices].astype(np.float64))
            again = dataset[(scan_index, 1000 + seed)]
            assert torch.equal(again[0], frames) and torch.equal(again[1], tforms)
        # A plain int k is item (k, k).
        assert all(torch.equal(a, b) for a, b in zip(dataset[2][:2], dataset[(2, 2)][:2]))
        # Different draw seeds give different windows.
        assert len({tuple(dataset.window_indices(0, s)) for s in range(50)}) > 10
    for h in handles:
        h.close()


def test_window_stride(sim_scans):
    # With num_samples == sample_range every offset is taken: the window is a progression of step s.
    dataset = FrameWindowDataset(sim_scans, num_samples=6, sample_range=6, max_stride=7)
    strides = set()
    for seed in range(200):
        indices = dataset.window_indices(seed % 4, seed)
        steps = set(np.diff(indices).tolist())
        assert len(steps) == 1
        stride = steps.pop()
        assert 1 <= stride and stride * 5 <= 23 and indices[0] >= 0 and indices[-1] <= 23
        strides.add(stride)
    assert strides == {1, 2, 3, 4}  # capped by (N-1) // (sample_range-1) = 23 // 5 below max_stride
    baseline = FrameWindowDataset(sim_scans, num_samples=2, sample_range=2)
    assert all(np.diff(baseline.window_indices(0, s)).tolist() == [1] for s in range(50))


def test_reversed_windows(sim_scans):
    forward = FrameWindowDataset(sim_scans, num_samples=3, sample_range=5)
    backward = FrameWindowDataset(sim_scans, num_samples=3, sample_range=5, reverse_prob=1.0)
    calib_r_t = torch.tensor(load_calibration(sim_scans[0].frames_path.parents[2] / CALIB_FILE).calib_R_T)
    for seed in range(10):
        f_frames, f_tforms, _ = forward[(1, seed)]
        b_frames, b_tforms, _ = backward[(1, seed)]
        assert np.all(np.diff(backward.window_indices(1, seed)) < 0)
        assert torch.equal(b_frames, f_frames.flip(0)) and torch.equal(b_tforms, f_tforms.flip(0))
        # Window (a, b, c) played backwards is (c, b, a): its pair (0, 1) is T_{c<-b}, the inverse
        # of the forward pair (1, 2), T_{b<-c}.
        f_rel = relative_transforms(f_tforms, [[1, 2]], calib_r_t)[0]
        b_rel = relative_transforms(b_tforms, [[0, 1]], calib_r_t)[0]
        torch.testing.assert_close(b_rel, torch.linalg.inv(f_rel), rtol=0, atol=1e-9)
    pair_forward = FrameWindowDataset(sim_scans, num_samples=2, sample_range=3)
    pair_backward = FrameWindowDataset(sim_scans, num_samples=2, sample_range=3, reverse_prob=1.0)
    for seed in range(5):
        f_rel = relative_transforms(pair_forward[(2, seed)][1], [[0, 1]], calib_r_t)[0]
        b_rel = relative_transforms(pair_backward[(2, seed)][1], [[0, 1]], calib_r_t)[0]
        torch.testing.assert_close(b_rel, torch.linalg.inv(f_rel), rtol=0, atol=1e-9)
        assert not torch.allclose(b_rel, f_rel, atol=1e-3)
    half = FrameWindowDataset(sim_scans, num_samples=3, sample_range=5, reverse_prob=0.5)
    reversed_count = sum(np.diff(half.window_indices(0, s))[0] < 0 for s in range(200))
    assert 60 < reversed_count < 140


def test_dataset_validation(sim_scans, odd_root):
    with pytest.raises(ValueError, match="num_samples=1"):
        FrameWindowDataset(sim_scans, 1, 2)
    with pytest.raises(ValueError, match="sample_range=3: expected an integer >= num_samples=4"):
        FrameWindowDataset(sim_scans, 4, 3)
    with pytest.raises(ValueError, match="scan sub000__LH_rotation .* has 24 frames, fewer than sample_range=25"):
        FrameWindowDataset(sim_scans, 2, 25)
    with pytest.raises(ValueError, match="reverse_prob"):
        FrameWindowDataset(sim_scans, 2, 2, reverse_prob=1.5)
    with pytest.raises(ValueError, match="max_stride"):
        FrameWindowDataset(sim_scans, 2, 2, max_stride=0)
    with pytest.raises(ValueError, match="differ in frame size"):
        FrameWindowDataset(sim_scans + find_scans(odd_root), 2, 2)
    with pytest.raises(ValueError, match="no scans"):
        FrameWindowDataset([], 2, 2)
    with pytest.raises(IndexError):
        FrameWindowDataset(sim_scans, 2, 2)[4]


def test_downsampled_windows(sim_scans):
    dataset = FrameWindowDataset(sim_scans, num_samples=2, sample_range=4, downsample=3)
    assert dataset.frame_size == (40, 53)
    frames, _, _ = dataset[(3, 5)]
    with ScanFile(sim_scans[3]) as scan:
        expected = downsample_frames(scan.read_frames(dataset.window_indices(3, 5)), 3)
    assert frames.shape == (2, 40, 53)
    np.testing.assert_array_equal(frames.numpy(), expected)
    dataset.close()


# --------------------------------------------------------------------------------------------
# Down-sampling and its cache
# --------------------------------------------------------------------------------------------


def block_mean_loops(image, f):
    h, w = image.shape[0] // f, image.shape[1] // f
    out = np.empty((h, w), np.uint8)
    for r in range(h):
        for c in range(w):
            total = 0.0
            for dr in range(f):
                for dc in range(f):
                    total += float(image[r * f + dr, c * f + dc])
            out[r, c] = np.rint(total / (f * f))
    return out


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 5])
def test_downsample_frames_is_the_block_mean(factor):
    frames = np.random.default_rng(factor).integers(0, 256, (3, 37, 53), dtype=np.uint8)
    expected = np.stack([block_mean_loops(image, factor) for image in frames])
    result = downsample_frames(frames, factor)
    assert result.dtype == np.uint8 and result.shape == (3, 37 // factor, 53 // factor)
    np.testing.assert_array_equal(result, expected)
    from_torch = downsample_frames(torch.from_numpy(frames), factor)
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.uint8
    np.testing.assert_array_equal(from_torch.numpy(), expected)
    if factor == 1:
        assert result is frames


def test_downsample_rounds_half_to_even():
    # Block means 0.5, 1.5, 2.5 (two 0/1 pixels out of four, etc.) round to 0, 2, 2 like np.rint.
    image = np.array([[0, 1, 1, 2, 2, 3], [0, 1, 1, 2, 2, 3]], np.uint8)
    np.testing.assert_array_equal(downsample_frames(image, 2), [[0, 2, 2]])
    np.testing.assert_array_equal(downsample_frames(torch.from_numpy(image), 2).numpy(), [[0, 2, 2]])


def test_downsample_frames_errors():
    with pytest.raises(ValueError, match="uint8"):
        downsample_frames(np.zeros((4, 4), np.float32), 2)
    with pytest.raises(ValueError, match="factor 0"):
        downsample_frames(np.zeros((4, 4), np.uint8), 0)
    with pytest.raises(ValueError, match="larger than the image"):
        downsample_frames(np.zeros((4, 6), np.uint8), 5)


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_downsampled_calibration_maps_block_centres(factor):
    calibration = default_calibration()
    small = downsampled_calibration(calibration, factor)
    height, width = 7 * factor + factor - 1, 5 * factor + 1  # trailing partial blocks are dropped
    h, w = height // factor, width // factor
    cols, rows = np.meshgrid(np.arange(1, w + 1), np.arange(1, h + 1))
    pixels = np.stack([cols.ravel(), rows.ravel(), np.zeros(h * w), np.ones(h * w)]).astype(np.float64)
    mapped = small.calib_R_T @ small.scale @ pixels
    # The centre of block (r, c) in original pixels: the mean of its f x f pixel coordinates.
    centres = np.empty_like(pixels)
    for k in range(h * w):
        c, r = int(pixels[0, k]), int(pixels[1, k])
        block_x = np.arange((c - 1) * factor + 1, c * factor + 1)
        block_y = np.arange((r - 1) * factor + 1, r * factor + 1)
        centres[:, k] = [block_x.mean(), block_y.mean(), 0.0, 1.0]
    np.testing.assert_allclose(mapped, calibration.calib_R_T @ calibration.scale @ centres, rtol=0, atol=1e-9)
    np.testing.assert_allclose(small.pixel_size_mm, np.array(calibration.pixel_size_mm) * factor, rtol=1e-15)


def test_cache_round_trip_and_reuse(tmp_path, sim_scans, odd_root, caplog):
    caplog.set_level("INFO", logger="utils.training_data")
    scans = sim_scans
    cached = cache_downsampled_scans(scans, 2, tmp_path)
    assert "4 scan(s) written, 0 reused" in caplog.text
    assert len({ref.frames_path.parents[2] for ref in cached}) == 1
    odd = find_scans(odd_root)  # the test layout, sizes that 2 does not divide
    odd_cached = cache_downsampled_scans(odd, 2, tmp_path)
    for ref, copy in zip(scans + odd, cached + odd_cached):
        assert (copy.subject, copy.subject_folder, copy.name, copy.key, copy.landmark_path) == (
            ref.subject, ref.subject_folder, ref.name, ref.key, ref.landmark_path)
        assert copy.frames_path == copy.tforms_path
        assert copy.frames_path.relative_to(tmp_path).parts[1:] == ("frames_transfs", ref.subject_folder, f"{ref.name}.h5")
        with ScanFile(ref) as source, ScanFile(copy) as target:
            np.testing.assert_array_equal(target.read_frames(), downsample_frames(source.read_frames(), 2))
            stored = source.read_tforms()
            assert target.read_tforms().dtype == stored.dtype
            np.testing.assert_array_equal(target.read_tforms(), stored)
        np.testing.assert_array_equal(read_scan_frames(ref, 2, chunk=5), read_scan_frames(copy))
    # The cached windows equal the on-the-fly ones, byte for byte.
    on_the_fly = FrameWindowDataset(scans[:4], 2, 5, downsample=2)
    from_cache = FrameWindowDataset(cached[:4], 2, 5)
    for seed in range(8):
        a, b = on_the_fly[(seed % 4, seed)], from_cache[(seed % 4, seed)]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    on_the_fly.close()
    from_cache.close()

    mtimes = [ref.frames_path.stat().st_mtime_ns for ref in cached]
    caplog.clear()
    assert cache_downsampled_scans(scans, 2, tmp_path) == cached
    assert "0 scan(s) written, 4 reused" in caplog.text
    assert [ref.frames_path.stat().st_mtime_ns for ref in cached] == mtimes
    # Another factor, or a changed source, gets a folder of its own.
    assert cache_downsampled_scans(scans[:1], 3, tmp_path)[0].frames_path.parents[2] != cached[0].frames_path.parents[2]
    os.utime(odd[-1].tforms_path, ns=(0, 12345))
    assert cache_downsampled_scans(odd, 2, tmp_path)[0].frames_path != odd_cached[0].frames_path
    with pytest.raises(ValueError, match="are both scan sub001__LH_rotation"):
        cache_downsampled_scans(scans + odd, 2, tmp_path)


# --------------------------------------------------------------------------------------------
# Sampler and loaders
# --------------------------------------------------------------------------------------------


def test_epoch_sampler_determinism():
    sampler = EpochSampler(7, samples_per_scan=3, seed=5)
    first = list(sampler)
    assert len(first) == len(sampler) == 21
    assert sorted(s for s, _ in first) == sorted(list(range(7)) * 3)
    assert len({d for _, d in first}) == 21
    assert list(EpochSampler(7, samples_per_scan=3, seed=5)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(EpochSampler(7, samples_per_scan=3, seed=6)) != first

    ordered = EpochSampler(4, samples_per_scan=2, shuffle=False, seed=5)
    items = list(ordered)
    assert [s for s, _ in items] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert list(EpochSampler(4, samples_per_scan=2, shuffle=False, seed=5)) == items
    ordered.set_epoch(3)
    assert [d for _, d in ordered] != [d for _, d in items]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_epoch_sampler_ranks(world_size):
    full = EpochSampler(7, samples_per_scan=3, seed=2).epoch_items()
    shares = []
    for rank in range(world_size):
        sampler = EpochSampler(7, samples_per_scan=3, seed=2, rank=rank, world_size=world_size)
        sampler.set_epoch(0)
        share = list(sampler)
        # Exactly DistributedSampler's padding and slicing, applied to the epoch's list.
        reference = DistributedSampler(range(21), num_replicas=world_size, rank=rank, shuffle=False)
        assert share == [full[i] for i in reference]
        assert len(sampler) == len(share) == -(-21 // world_size)
        shares.append(share)
    covered = [item for share in shares for item in share]
    assert set(covered) == set(full)
    positions = [k for rank in range(world_size) for k in range(rank, len(covered), world_size)]
    assert len(set(positions)) == len(positions)  # disjoint slices of the padded list


def test_epoch_sampler_start():
    sampler = EpochSampler(5, samples_per_scan=2, seed=1, rank=1, world_size=2)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_start(3)
    assert list(sampler) == full[3:] and len(sampler) == 2
    sampler.set_start(5)
    assert list(sampler) == [] and len(sampler) == 0
    sampler.set_epoch(5)
    assert sampler.start == 0 and len(sampler) == 5
    with pytest.raises(ValueError, match="0..5"):
        sampler.set_start(6)
    with pytest.raises(ValueError, match="rank=2 must be below world_size=2"):
        EpochSampler(5, rank=2, world_size=2)


def test_dataloader_collates_and_matches(sim_scans):
    dataset = FrameWindowDataset(sim_scans, num_samples=3, sample_range=6, downsample=2)
    sampler = EpochSampler(len(dataset), samples_per_scan=3, seed=9)
    loader = DataLoader(dataset, batch_size=5, sampler=sampler, num_workers=2)
    items = list(sampler)
    seen = 0
    for frames, tforms, scan_index in loader:
        assert frames.dtype == torch.uint8 and frames.shape[1:] == (3, 60, 80)
        assert tforms.dtype == torch.float64 and tforms.shape[1:] == (3, 4, 4)
        assert scan_index.dtype == torch.int64 and frames.shape[0] == tforms.shape[0] == scan_index.shape[0]
        for b in range(frames.shape[0]):
            expected = dataset[items[seen]]
            assert int(scan_index[b]) == expected[2]
            assert torch.equal(frames[b], expected[0]) and torch.equal(tforms[b], expected[1])
            seen += 1
    assert seen == 12
    dataset.close()


def test_files_opened_once_per_worker(sim_scans, tmp_path, monkeypatch):
    dataset = FrameWindowDataset(sim_scans, num_samples=2, sample_range=4)
    log = tmp_path / "opens.txt"

    class CountingScanFile(ScanFile):
        def __init__(self, ref):
            with open(log, "a") as handle:  # a file: counts from forked workers come back too
                handle.write(f"{os.getpid()} {ref.key}\n")
            super().__init__(ref)

    monkeypatch.setattr(td, "ScanFile", CountingScanFile)
    sampler = EpochSampler(len(dataset), samples_per_scan=10)

    def opens_by_pid():
        lines = log.read_text().split("\n")[:-1] if log.exists() else []
        log.unlink(missing_ok=True)
        counts = {}
        for line in lines:
            pid, key = line.split()
            counts.setdefault(pid, []).append(key)
        return counts

    assert sum(f.shape[0] for f, _, _ in DataLoader(dataset, batch_size=4, sampler=sampler)) == 40
    counts = opens_by_pid()
    assert list(counts) == [str(os.getpid())] and sorted(counts[str(os.getpid())]) == sorted(r.key for r in sim_scans)

    # The main process holds open files now; forked workers must open their own, once each.
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2, multiprocessing_context="fork")
    assert sum(f.shape[0] for f, _, _ in loader) == 40
    counts = opens_by_pid()
    assert len(counts) == 2 and str(os.getpid()) not in counts
    for keys in counts.values():
        assert len(keys) == len(set(keys)) <= len(sim_scans)
    dataset.close()


def test_pickles_without_handles(sim_scans):
    dataset = FrameWindowDataset(sim_scans, num_samples=2, sample_range=3)
    first = dataset[(0, 1)]
    assert dataset._files
    clone = pickle.loads(pickle.dumps(dataset))
    assert not clone._files and not clone._poses
    again = clone[(0, 1)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    handles = list(dataset._files.values())
    dataset.close()
    clone.close()
    assert not dataset._files and all(not h._frames_file.id.valid for h in handles)
    assert torch.equal(dataset[(0, 1)][0], first[0])  # reopens lazily
    dataset.close()


def test_open_files_are_bounded(sim_scans, caplog):
    dataset = FrameWindowDataset(sim_scans, num_samples=2, sample_range=3)
    reference = [dataset[(k % 4, k)] for k in range(8)]
    dataset.close()
    dataset.max_open_files = 2
    for k in range(8):
        frames, tforms, _ = dataset[(k % 4, k)]
        assert torch.equal(frames, reference[k][0]) and torch.equal(tforms, reference[k][1])
        assert len(dataset._files) <= 2
    assert list(dataset._files) == [2, 3] and len(dataset._poses) == 4
    assert "at most 2 open files" in caplog.text
    dataset.close()
