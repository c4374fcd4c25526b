"""oop_headroom.py: the errors of the true motion with its out-of-plane direction changed, against
closed forms for a fan about the image's top edge."""

import math

import numpy as np
import pandas as pd
import pytest

import oop_headroom
from utils.calibration import write_calib_matrices
from utils.challenge_data import write_scan
from utils.errors import InputError
from test_moves import swing_increments

HEIGHT, WIDTH, PIXEL_MM, STEP_RAD, FRAMES = 8, 10, 0.5, 0.03, 6


def rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1]], dtype=np.float64)


@pytest.fixture()
def fan_data(tmp_path):
    """One scan whose frame i is frame 0 turned by i x STEP_RAD about the image's x axis (the calibration is
    the identity rotation, so image mm = tool mm): pure out-of-plane a_X, no in-plane motion."""
    write_calib_matrices(tmp_path / "calib_matrix.csv", np.diag([PIXEL_MM, PIXEL_MM, 1.0, 1.0]), np.eye(4))
    frames = np.zeros((FRAMES, HEIGHT, WIDTH), dtype=np.uint8)
    write_scan(tmp_path, 0, "LH_rotation", frames, np.stack([rot_x(i * STEP_RAD) for i in range(FRAMES)]))
    return tmp_path


def fan_errors(angle_of_prediction) -> tuple[float, float]:
    """GPE and LPE when frame i is predicted turned by ``angle_of_prediction(i)`` instead of i x STEP_RAD
    (the local transform by ``angle_of_prediction(1)``): a pixel at y mm is off by 2 |y sin((a - b) / 2)|."""
    y_mm = np.arange(1, HEIGHT + 1) * PIXEL_MM  # pixels count from 1
    per_frame = [np.mean(2 * np.abs(y_mm * np.sin((i * STEP_RAD - angle_of_prediction(i)) / 2)))
                 for i in range(1, FRAMES)]
    local = np.mean(2 * np.abs(y_mm * np.sin((STEP_RAD - angle_of_prediction(1)) / 2)))
    return float(np.mean(per_frame)), float(local)


def test_errors_of_each_variant_match_the_closed_form(fan_data, tmp_path):
    out, summary = oop_headroom.main(["--data_path", str(fan_data), "--sign_accuracy", "1", "0.5",
                                      "--block", "1", "--out", str(tmp_path / "out")])
    mirrored = fan_errors(lambda i: -i * STEP_RAD)
    in_plane_only = fan_errors(lambda i: 0.0)
    assert summary.loc["mirrored", "GPE"] == pytest.approx(mirrored[0], rel=1e-6)
    assert summary.loc["mirrored", "LPE"] == pytest.approx(mirrored[1], rel=1e-6)
    # right or mirrored as a whole, each half the time: half the mirrored errors in expectation
    assert summary.loc[oop_headroom.COIN_PER_SCAN, "GPE"] == pytest.approx(mirrored[0] / 2, rel=1e-6)
    assert summary.loc[oop_headroom.COIN_PER_SCAN, "LPE"] == pytest.approx(mirrored[1] / 2, rel=1e-6)
    assert summary.loc["in-plane only", "GPE"] == pytest.approx(in_plane_only[0], rel=1e-6)
    assert summary.loc["in-plane only", "LPE"] == pytest.approx(in_plane_only[1], rel=1e-6)
    assert summary.loc["sign 1, blocks of 1", "GPE"] < 1e-6  # always right: the truth (float32 poses re-chained)
    # sure to 1/2, the shrunk prediction is no out-of-plane motion at all
    assert summary.loc["shrunk 0.5, blocks of 1", "GPE"] == pytest.approx(in_plane_only[0], rel=1e-6)
    assert summary.loc["mirrored", "GPE_vs_in_plane_only"] == pytest.approx(mirrored[0] / in_plane_only[0], rel=1e-6)
    assert math.isnan(summary.loc["mirrored", "GLE"])  # no landmark file: absent, not 0
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == len(summary) and set(scores["scan"]) == {"LH_rotation"}
    assert pd.read_csv(out / "summary.csv", index_col=0).index.tolist() == summary.index.tolist()


def test_direction_draws_share_one_draw_per_block_and_are_right_as_often_as_asked():
    rng = np.random.default_rng(1)
    signs = oop_headroom.direction_draws(100_003, 0.8, 7, rng).numpy()
    assert len(signs) == 100_003 and set(np.unique(signs)) == {-1.0, 1.0}
    blocks = signs[:100_002].reshape(-1, 7)
    assert (blocks == blocks[:, :1]).all()
    draws = len(blocks)
    assert abs((blocks[:, 0] > 0).mean() - 0.8) < 4 * math.sqrt(0.8 * 0.2 / draws)


@pytest.mark.parametrize(("argv", "message"), [
    (["--sign_accuracy", "0.4"], r"--sign_accuracy \[0.4\]: expected probabilities in 0.5..1"),
    (["--block", "0"], r"--block \[0\]: expected whole numbers of pairs >= 1"),
])
def test_bad_arguments_are_refused_before_anything_is_written(fan_data, tmp_path, argv, message):
    with pytest.raises(InputError, match=message):
        oop_headroom.main(["--data_path", str(fan_data), "--out", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


def test_segment_draws_share_one_draw_per_segment_and_are_right_as_often_as_asked():
    segments = np.repeat(np.arange(20_000), np.arange(20_000) % 5 + 1)
    signs = oop_headroom.segment_draws(segments, 0.8, np.random.default_rng(2)).numpy()
    first = np.r_[0, np.flatnonzero(np.diff(segments)) + 1]
    assert (signs == signs[first][segments]).all()
    assert abs((signs[first] > 0).mean() - 0.8) < 4 * math.sqrt(0.8 * 0.2 / 20_000)


def test_a_returning_fan_mirrored_as_a_whole_leaves_no_error_after_it(tmp_path):
    """Per move, a wrong direction costs only while the fan lasts: frame i is off by 2 |y sin(theta_i)|
    during it and by nothing once it has swung back, where mistakes in blocks cut across it last."""
    fan = swing_increments(10.0, 20, 1)
    angles = np.concatenate([[0.0], np.cumsum(np.concatenate([fan, np.zeros(30)]))])
    write_calib_matrices(tmp_path / "calib_matrix.csv", np.diag([PIXEL_MM, PIXEL_MM, 1.0, 1.0]), np.eye(4))
    write_scan(tmp_path, 0, "LH_rotation", np.zeros((len(angles), HEIGHT, WIDTH), dtype=np.uint8),
               np.stack([rot_x(a) for a in angles]))
    out, summary = oop_headroom.main(["--data_path", str(tmp_path), "--sign_accuracy", "1", "0.5",
                                      "--block", "1", "--out", str(tmp_path / "out")])
    y_mm = np.arange(1, HEIGHT + 1) * PIXEL_MM
    mirrored = np.mean([np.mean(2 * np.abs(y_mm * np.sin(a))) for a in angles[1:]])
    assert summary.loc["mirrored", "GPE"] == pytest.approx(mirrored, rel=1e-5)
    assert summary.loc["sign 1, per move", "GPE"] < 1e-5
    # the stillness has no out-of-plane motion to get wrong: a per-move draw is the truth or the mirror
    per_move = summary.loc["sign 0.5, per move", "GPE"]
    assert per_move < 1e-5 or per_move == pytest.approx(mirrored, rel=1e-5)
    assert summary.loc["sign 0.5, blocks of 1", "GPE"] > 2e-3  # scattered mistakes: neither (unless all 40 fan pairs alike: 2^-39)
    assert pd.read_csv(out / "scores.csv")["segments"].iloc[0] == 2  # the fan, then the stillness
