"""A simulated trackerless prediction: the true motion, slightly under-estimated and noisy, chained.

What a frame-to-frame network typically does (regression to the mean shrinks the predicted motion;
each local estimate carries noise), without training one: for pictures of what pose errors do to a
reconstruction and for checking scoring code on realistic, drifting predictions.
"""

from __future__ import annotations

import numpy as np
import torch

from utils import transform as tf


def drifting_prediction(local_true: torch.Tensor, rng: np.random.Generator, bias: float = 0.9,
                        noise_mm: float = 0.03, noise_rad: float = 0.002) -> torch.Tensor:
    """Predicted local transforms [N-1, 4, 4]: the true 6-DOF motion times ``bias`` plus Gaussian noise.

    Args:
        local_true: [N-1, 4, 4] float64 ``T_{i-1<-i}`` (image mm).
        rng: the noise's generator.
        bias: factor on the true parameters (``[a_Z, a_Y, a_X, t_x, t_y, t_z]``).
        noise_mm, noise_rad: standard deviations of the added translation (mm) and angle (rad) noise.
    Chain the result with ``utils.transform.chain_local_transforms`` for global transforms.
    """
    params = tf.matrix_to_params(local_true)
    noise = torch.from_numpy(np.concatenate(
        [rng.normal(0, noise_rad, (len(params), 3)), rng.normal(0, noise_mm, (len(params), 3))], axis=1))
    return tf.params_to_matrix(params * bias + noise)
