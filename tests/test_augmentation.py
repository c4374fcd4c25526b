"""Sweep augmentations (utils/augmentation.py, FrameWindowDataset): the augmented labels are the true
motion of the augmented frames, checked against point mappings and against the motion that block
matching measures in the augmented frames themselves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import models
from utils import transform as tf
from utils.augmentation import Mirror, apply_gain
from utils.calibration import make_calibration
from utils.training_data import FrameWindowDataset

SCALE = np.diag([0.229389190673828, 0.220979690551758, 1.0, 1.0])


def _random_rigid(rng, translation_mm: float = 100.0) -> np.ndarray:
    params = torch.tensor(np.r_[rng.uniform(-math.pi, math.pi, 3), rng.uniform(-translation_mm, translation_mm, 3)])
    return tf.params_to_matrix(params[None])[0].numpy()


def _label(tforms: np.ndarray, calib: np.ndarray) -> np.ndarray:
    """T_{0<-1} of a 2-frame window, with the training pipeline's own function."""
    relative = tf.relative_transforms(torch.from_numpy(tforms)[None], tf.pair_samples(2, 1), torch.from_numpy(calib))
    return relative[0, 0].numpy()


@pytest.mark.parametrize("seed", range(4))
def test_mirrored_poses_give_the_motion_of_mirrored_points(seed):
    """A tissue point at p in frame 1 is at T p in frame 0. Mirrored, it is at F p in frame 1' and
    must be at F T p in frame 0': the label of the mirrored poses maps F p to F (T p)."""
    rng = np.random.default_rng(seed)
    calib = _random_rigid(rng, 50.0)
    poses = np.stack([_random_rigid(rng), _random_rigid(rng)])
    mirror = Mirror(calib, axis_mm=147.0)
    mirrored = mirror.poses(poses)
    points = np.c_[rng.uniform(0, 147, (20, 2)), np.zeros(20), np.ones(20)].T  # image mm, z = 0
    reflect = lambda q: np.stack([147.0 - q[0], q[1], q[2], q[3]])  # noqa: E731  x' = axis - x
    motion, mirrored_motion = _label(poses, calib), _label(mirrored, calib)
    np.testing.assert_allclose(mirrored_motion @ reflect(points), reflect(motion @ points), atol=1e-9)
    # The mirrored poses are proper rigid poses (the readers' checks hold) and so is the motion.
    for pose in (*mirrored, mirrored_motion):
        np.testing.assert_allclose(pose[:3, :3].T @ pose[:3, :3], np.eye(3), atol=1e-12)
        assert np.linalg.det(pose[:3, :3]) == pytest.approx(1.0)
        np.testing.assert_array_equal(pose[3], [0, 0, 0, 1])


def test_mirror_axis_maps_pixel_columns_onto_their_mirror_images():
    """Column c (from 1) of W becomes column W + 1 - c; down-sampled by k to w columns, block b
    (from 0, centred on original column k b + (k + 1) / 2) becomes block w - 1 - b."""
    calibration = make_calibration(SCALE, np.eye(4))
    sx = SCALE[0, 0]
    full = Mirror.for_frames(calibration, 640).image_reflection()
    for column in (1, 17, 320, 640):
        moved = full @ np.array([column * sx, 5.0, 0.0, 1.0])
        assert moved[0] == pytest.approx((641 - column) * sx)
        assert moved[1] == 5.0
    reduced = Mirror.for_frames(calibration, 213, factor=3).image_reflection()  # 640 // 3 = 213 blocks
    for block in (0, 100, 212):
        centre = 3 * block + 2.0
        mirrored_centre = 3 * (212 - block) + 2.0
        assert (reduced @ np.array([centre * sx, 0, 0, 1]))[0] == pytest.approx(mirrored_centre * sx)


def test_gain_scales_and_clips():
    frames = np.array([[[0, 10, 100, 200, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(apply_gain(frames, 1.5), [[[0, 15, 150, 255, 255]]])
    np.testing.assert_array_equal(apply_gain(frames, 0.5), [[[0, 5, 50, 100, 128]]])
    with pytest.raises(ValueError, match="gain"):
        apply_gain(frames, 0.0)


@pytest.fixture(scope="module")
def demo_scan(tmp_path_factory):
    from simulation.dataset import generate_dataset
    from utils.calibration import load_calibration
    from utils.challenge_data import find_scans

    root = tmp_path_factory.mktemp("augment")
    generate_dataset(root, "demo", seed=6, subjects=1, frames=24)
    return find_scans(root)[:1], load_calibration(root / "calib_matrix.csv")


def test_dataset_mirrors_frames_and_poses_together_and_keeps_the_other_draws(demo_scan):
    scans, calibration = demo_scan
    plain = FrameWindowDataset(scans, 2, 3)
    mirror = Mirror.for_frames(calibration, 640)
    flipped = FrameWindowDataset(scans, 2, 3, flip_prob=1.0, mirror=mirror, gain_jitter=0.2)
    for seed in range(5):
        assert np.array_equal(plain.window_indices(0, seed), flipped.window_indices(0, seed))
        frames, tforms, _ = plain[(0, seed)]
        frames_f, tforms_f, _ = flipped[(0, seed)]
        _, mirrored, gain = flipped.window_draw(0, seed)
        assert mirrored and 0.8 <= gain <= 1.2
        np.testing.assert_array_equal(frames_f.numpy(), apply_gain(frames.numpy()[..., ::-1], gain))
        np.testing.assert_allclose(tforms_f.numpy(), mirror.poses(tforms.numpy()), atol=0)


def test_block_matching_measures_the_mirrored_label_in_mirrored_frames(demo_scan):
    """The independent check: patch_flow (untrained: block matching) measures the in-plane motion
    of the frames it is given. On mirrored frames it must measure the mirrored label's motion
    (rotation about the normal and lateral translation reversed, with the mirror's offset), and
    that must differ clearly from the original label where the original motion is not tiny."""
    scans, calibration = demo_scan
    mirror = Mirror.for_frames(calibration, 640)
    dataset = FrameWindowDataset(scans, 2, 2, flip_prob=1.0, mirror=mirror)
    plain = FrameWindowDataset(scans, 2, 2)
    model = models.build_model("patch_flow", 2, 6, pixel_mm=[SCALE[0, 0], SCALE[1, 1]], radius=12,
                               robust_iterations=3)
    model.init_at_identity()
    model.eval()
    calib = np.array(calibration.calib_R_T)
    errors_mirrored, errors_unmirrored = [], []
    for seed in range(6):
        frames, tforms, _ = dataset[(0, seed)]
        with torch.no_grad():
            measured = tf.params_to_matrix(model(frames[None].float() / 255).double())[0].numpy()
        label = _label(tforms.numpy(), calib)
        original = _label(plain[(0, seed)][1].numpy(), calib)
        centre = np.array([320.5 * SCALE[0, 0], 240.5 * SCALE[1, 1], 0.0, 1.0])
        errors_mirrored.append(np.linalg.norm((measured @ centre - label @ centre)[:2]))
        errors_unmirrored.append(np.linalg.norm((measured @ centre - original @ centre)[:2]))
    # Block matching is good to a few hundredths of a mm here; the unmirrored label is off by the
    # mirror's effect on the motion (mm-scale for these pairs).
    assert np.median(errors_mirrored) < 0.05, errors_mirrored
    assert np.median(errors_unmirrored) > 3 * np.median(errors_mirrored), (errors_mirrored, errors_unmirrored)


def test_bad_augmentation_settings_are_refused(demo_scan):
    scans, calibration = demo_scan
    with pytest.raises(ValueError, match="flip_prob=0.5: mirroring needs"):
        FrameWindowDataset(scans, 2, 2, flip_prob=0.5)
    with pytest.raises(ValueError, match="flip_prob=1.5"):
        FrameWindowDataset(scans, 2, 2, flip_prob=1.5, mirror=Mirror.for_frames(calibration, 640))
    with pytest.raises(ValueError, match="gain_jitter=1.0"):
        FrameWindowDataset(scans, 2, 2, gain_jitter=1.0)
