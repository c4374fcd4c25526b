"""SeqFlow: a sequence model that predicts every local transform of a window of frames in one pass.

Why (issue 12): two frames tell how far the probe moved out of the image plane (the speckle
decorrelates) but not which way, and the whole-scan errors are dominated by that direction and by
the drift it accumulates. What can tell the direction is context: the scanning protocol swings the
probe back and forth (its speed falls to zero at each turn, where the direction reverses), frames a
few apart decorrelate by how far apart they really are (a turn shows as frames i-1 and i+1 being
more alike than their steps suggest), and the anatomy changes one way or the other as the plane
moves along a tapering arm. So, per window of ``num_frames`` consecutive frames:

1. **Pair features** from the 2-frame encoder (``PatchFlowNet``, shared: ``--init_weights`` of a
   ``patch_flow`` checkpoint loads into it), for every pair ``(i, i+k)`` of the window and each
   offset k of ``offsets``: the in-plane motion it measures (k = 1) and how much each patch's speckle
   decorrelated (its best normalised cross-correlation), averaged into a 3 x 3 grid of depth x
   lateral position (a fan about the probe face decorrelates deep patches most, a turn about the
   beam axis the lateral ones) plus the frame's mean. No learned weights up to here when the encoder
   is frozen (``freeze_encoder``, the default for stage 2 of training), so none of that computation
   keeps a graph.
2. **Appearance**: every frame reduced to a fixed 60 x 80 thumbnail (area averaging, any frame size),
   summarised by its brightness moments (``frame_moments``: where the echoes are, whose drift up or
   down the image tells which way a fan tilts along the tapering arm) and, unless ``appearance_dim``
   is 0, encoded by a small CNN into a vector that keeps where things are (the arm's outline, bones,
   vessels): the change of anatomy between frames is the only cue of direction the images carry.
   (On 16 training scans that CNN memorised them; issue 12's note and the README give the figures.)
3. **A temporal model** over the window's steps (step i = the transition from frame i-1 to frame i):
   a 2-layer bidirectional GRU, so each step sees the whole window before and after it.
4. **The output**: per step, the encoder's in-plane motion plus a learned correction, and the
   out-of-plane motion (a_Y, a_X, t_z), both from a last linear layer that starts at zero (scaled
   by each DOF's spread over the training labels, ``set_label_statistics``): untrained, the model
   predicts exactly what its encoder does, and out-of-plane motion only as far as training finds
   its direction.

A stage-2 run with the encoder fixed can measure each scan once (``measure_scan``) and train on
windows sliced from it (``utils.training_data.MeasuredWindowDataset``): ``forward`` takes a window's
frames or its ``measure`` dict alike.

Input [B, num_frames, H, W] frames in [0, 1]; output [B, (num_frames - 1) * 6]: the ``parameter``
prediction of ``T_{i-1<-i}`` for i = 1..num_frames-1 (``utils.transform.consecutive_pairs`` order,
``utils.transform`` conventions: radians and mm in frame i-1's image mm).
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from models.patch_flow import PatchFlowNet
from models.registry import register_model
from utils.errors import InputError

THUMBNAIL = (60, 80)  # rows, columns of the appearance branch's input: 480x640 down-sampled by 8
GRID = 3  # depth bands x lateral bands of the decorrelation features
MOMENTS = 4  # frame_moments per frame
MOMENT_CHANGE_SCALE = 100.0
# Pairs per encoder call: bounds the memory of stacking a window's frame pairs (2 x 480 x 640 floats each).
ENCODER_CHUNK = 64
# Part of ``measurement_key``: bump it whenever ``measure_scan`` gives other numbers for the same
# weights and settings, so measurements cached on disk by an earlier version are not reused.
# 2: the fixed encoder measures in eval mode from construction on (version 1 cached jittered patch grids).
MEASUREMENT_VERSION = 2


def frame_moments(thumbnails: torch.Tensor) -> torch.Tensor:
    """[n, h, w] thumbnails in [0, 1] -> [n, 4]: the mean brightness and the brightness-weighted centre
    (x, y, relative to the image, -0.5..0.5) and vertical spread of each frame.

    Why: the arm tapers and its bones rise towards the wrist, so when the plane tilts one way its echoes
    move up the image and the other way down. On the 8 transverse scans among the first 12 of the
    README's ``data/sim2025_train`` (tusrec2025 preset) the change of the centre's row from frame to
    frame correlates with the signed fan (a_X) at -0.19 on average (7 of 8 negative; near 0 on the
    longitudinal ones): a weak cue per pair that a window of frames can add up, and one a small CNN
    would have to discover first.
    """
    height, width = thumbnails.shape[-2:]
    rows = (torch.arange(height, dtype=thumbnails.dtype, device=thumbnails.device) + 0.5) / height - 0.5
    cols = (torch.arange(width, dtype=thumbnails.dtype, device=thumbnails.device) + 0.5) / width - 0.5
    total = thumbnails.sum(dim=(1, 2)).clamp_min(1e-6)
    row_profile, col_profile = thumbnails.sum(dim=2), thumbnails.sum(dim=1)
    centre_y = (row_profile * rows).sum(dim=1) / total
    centre_x = (col_profile * cols).sum(dim=1) / total
    spread_y = ((row_profile * (rows - centre_y[:, None]).pow(2)).sum(dim=1) / total).clamp_min(0).sqrt()
    return torch.stack([thumbnails.mean(dim=(1, 2)), centre_x, centre_y, spread_y], dim=1)


def decorrelation_grid(peak: torch.Tensor, position: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """Each patch's best correlation averaged into a ``grid`` x ``grid`` array of places, plus the mean.

    Args:
        peak: [N, K] best normalised cross-correlation of each patch.
        position: [N, K, 2] patch centres (x, y) relative to the frame, -0.5..0.5.
    Returns:
        [N, grid * grid + 1]: for each cell (depth band major, lateral band minor) the Gaussian-weighted
        mean of the patches near its centre (width a cell), drawn towards the frame's mean where no
        patch is near (a cell outside the sector or in a shadow holds none), then the frame's mean.
    """
    centres = (torch.arange(grid, dtype=peak.dtype, device=peak.device) + 0.5) / grid - 0.5
    cell_y, cell_x = torch.meshgrid(centres, centres, indexing="ij")
    cells = torch.stack([cell_x.reshape(-1), cell_y.reshape(-1)], dim=-1)  # [G, 2] (x, y)
    distance2 = (position[:, :, None, :] - cells[None, None]).pow(2).sum(dim=-1)  # [N, K, G]
    weight = torch.exp(-distance2 * (grid * grid / 2.0))  # sigma = one cell
    mean = peak.mean(dim=1, keepdim=True)
    prior = 0.1  # patches' worth of the frame's mean in each cell
    cell_mean = ((weight * peak[:, :, None]).sum(dim=1) + prior * mean) / (weight.sum(dim=1) + prior)
    return torch.cat([cell_mean, mean], dim=1)


class AppearanceEncoder(nn.Module):
    """[N, h, w] thumbnails in [0, 1] -> [N, dim]: four stride-2 convolutions, then a linear layer
    over the 4 x 5 map (not a global pool: where a structure is in the image is the cue)."""

    def __init__(self, dim: int = 32, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        )
        self.project = nn.Linear(2 * width * 4 * 5, dim)

    def forward(self, thumbnails: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(thumbnails[:, None]).flatten(1))


class SeqFlowNet(nn.Module):
    """[B, num_frames, H, W] frames in [0, 1] -> [B, (num_frames - 1) * 6] local ``parameter`` predictions.

    Args:
        num_frames: frames per window (NUM_SAMPLES); the GRU itself takes any length, the output
            width is fixed by the registry's contract.
        pixel_mm, patch_size, num_patches, radius, robust_iterations, patch_selection: the encoder's
            (``PatchFlowNet``), as the ``patch_flow`` checkpoint it starts from was trained with.
        offsets: frame distances k of the pairs (i, i+k) whose decorrelation is measured; 1 must be
            among them (it gives the in-plane motion).
        hidden: width of the GRU (per direction) and of its input projection.
        appearance_dim: size of each frame's learned appearance vector; 0 = none (the brightness moments only).
        freeze_encoder: keep the encoder's weights fixed (no gradient, always in eval mode: its
            patch grid is not jittered), as stage 2 of training wants; False trains it too.
    """

    def __init__(self, num_frames: int, pixel_mm=(1.0, 1.0), patch_size: int = 64, num_patches: int = 32,
                 radius: int = 8, robust_iterations: int = 0, patch_selection: str = "speckle",
                 offsets=(1, 2, 4), hidden: int = 64, appearance_dim: int = 32, freeze_encoder: bool = True):
        super().__init__()
        offsets = tuple(int(k) for k in offsets)
        if num_frames < 2:
            raise InputError(f"num_frames={num_frames}: a window needs at least 2 frames")
        if 1 not in offsets or any(not 1 <= k < num_frames for k in offsets) or len(set(offsets)) != len(offsets):
            raise InputError(f"offsets={list(offsets)}: expected distinct frame distances in 1..{num_frames - 1}, "
                             f"1 among them")
        self.num_frames, self.offsets = int(num_frames), offsets
        self.freeze_encoder = bool(freeze_encoder)
        self.encoder = PatchFlowNet(pixel_mm=pixel_mm, patch_size=patch_size, num_patches=num_patches, radius=radius,
                                    robust_iterations=robust_iterations, patch_selection=patch_selection)
        if self.freeze_encoder:
            # Fixed from the start, in eval mode too (``train`` keeps it there): whatever measures with the
            # model as built (``--feature_cache``) sees the patch grid prediction sees, not a jittered one.
            self.encoder.requires_grad_(False).eval()
        # appearance_dim 0: the brightness moments alone (a learned encoder of 16 training scans' thumbnails
        # memorises them: issue 12's cached run got worse on validation from its fifth epoch).
        self.appearance = AppearanceEncoder(appearance_dim) if appearance_dim > 0 else None
        step_features = 3 + len(offsets) * (GRID * GRID + 1) + 2 * (MOMENTS + appearance_dim)
        self.project = nn.Sequential(nn.Linear(step_features, hidden), nn.GELU())
        self.temporal = nn.GRU(hidden, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 6)
        # Each DOF's spread over the training labels (set_label_statistics): the head's output unit.
        self.register_buffer("label_std", torch.ones(6))
        self.init_at_identity()

    @property
    def pixel_mm(self) -> torch.Tensor:
        """The encoder's pixel size (whole-scan prediction sets it to the scanned data's)."""
        return self.encoder.pixel_mm

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def measurement_key(self) -> str:
        """A digest of everything ``measure_scan`` depends on besides the frames: the encoder's weights
        and buffers, its settings, the offsets and ``MEASUREMENT_VERSION`` (``--feature_cache`` files on
        disk are named by it, ``utils.training_data.measurement_cache_path``)."""
        encoder = self.encoder
        settings = {"version": MEASUREMENT_VERSION, "offsets": list(self.offsets), "patch_size": encoder.patch_size,
                    "num_patches": encoder.num_patches, "radius": encoder.radius, "jitter": encoder.jitter,
                    "robust_iterations": encoder.robust_iterations, "patch_selection": encoder.patch_selection,
                    "thumbnail": list(THUMBNAIL)}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for name, tensor in sorted(encoder.state_dict().items()):
            digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def set_label_statistics(self, mean: torch.Tensor, std: torch.Tensor, frame_size) -> None:
        """Measure the head's outputs in units of each DOF's spread over the training labels."""
        with torch.no_grad():
            self.label_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def init_at_identity(self) -> None:
        """The untrained prediction is the encoder's (block matching when it is untrained too)."""
        self.encoder.init_at_identity()
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()

    def _encode_pairs(self, pairs_between, count: int, offset: int) -> dict:
        """The encoder's measurements of ``count`` pairs, ``ENCODER_CHUNK`` at a time: ``pairs_between(a, b)``
        gives pairs a..b-1 as [b - a, 2, H, W] frames in [0, 1].

        Returns {"peak": [count, K], "position": [count, K, 2]} and, for ``offset`` 1, "params" [count, 6]
        (``PatchFlowNet.measure``); the longer offsets need only the correlation peaks, whose cost
        volumes are not learned (``PatchFlowNet.correlate``: a third of the time saved).
        """
        parts = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            for start in range(0, count, ENCODER_CHUNK):
                pairs = pairs_between(start, min(start + ENCODER_CHUNK, count))
                if offset == 1:
                    parts.append(self.encoder.measure(pairs))
                else:
                    correlation, _, position = self.encoder.correlate(pairs)
                    parts.append({"peak": correlation.amax(dim=(1, 2)).reshape(position.shape[:2]), "position": position})
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0] if key != "weight"}

    def _looks(self, thumbnails: torch.Tensor) -> torch.Tensor:
        """[n, 60, 80] thumbnails -> [n, MOMENTS + appearance_dim]: ``frame_moments`` and the learned
        appearance vector."""
        moments = frame_moments(thumbnails)
        return moments if self.appearance is None else torch.cat([moments, self.appearance(thumbnails)], dim=1)

    def _assemble(self, features: dict, starts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The temporal model's inputs for windows of ``length`` frames of measured sequences.

        Args:
            features: of S sequences of M frames: ``grids`` {offset k: [S, M - k, G] the decorrelation
                grid of each pair (a, a + k)}, ``params`` [S, M - 1, 6] the encoder's prediction of
                each consecutive pair, ``looks`` [S, M, A] each frame's appearance.
            starts: long [S, W], first frame of each window in its sequence.
        Returns:
            ``(steps [S * W, length - 1, F], encoder_params [S * W, length - 1, 6])``. Step i of a window
            (its frame i-1 -> i) reads, for each offset k, its pair (a, a + k) centred on the step,
            a = i - 1 - (k - 1) // 2, clamped into the window: what the window alone shows.
        """
        sequence = torch.arange(starts.shape[0], device=starts.device)[:, None, None]
        rows = torch.arange(length - 1, device=starts.device)
        grids = []
        for offset in self.offsets:
            first = (rows - (offset - 1) // 2).clamp(0, length - 1 - offset)
            grids.append(features["grids"][offset][sequence, starts[..., None] + first])  # [S, W, L-1, G]
        encoder_params = features["params"][sequence, starts[..., None] + rows]
        looks = features["looks"][sequence, starts[..., None] + torch.arange(length, device=starts.device)]
        in_plane = encoder_params[..., [0, 3, 4]] / self.label_std[[0, 3, 4]]
        # The moments move by thousandths of the image per frame: their change is scaled to order 1.
        moments, appearance = looks[..., :MOMENTS], looks[..., MOMENTS:]
        change = torch.cat([MOMENT_CHANGE_SCALE * (moments[..., 1:, :] - moments[..., :-1, :]),
                            0.5 * (moments[..., 1:, :] + moments[..., :-1, :]),
                            appearance[..., 1:, :] - appearance[..., :-1, :],
                            0.5 * (appearance[..., 1:, :] + appearance[..., :-1, :])], dim=-1)
        steps = torch.cat([in_plane] + grids + [change], dim=-1)
        return steps.flatten(0, 1), encoder_params.flatten(0, 1)

    def decode(self, steps: torch.Tensor, encoder_params: torch.Tensor) -> torch.Tensor:
        """[S, T, F] step inputs and [S, T, 6] encoder predictions -> [S, T, 6] local parameters."""
        context, _ = self.temporal(self.project(steps))
        return encoder_params + self.head(context) * self.label_std

    def forward(self, frames) -> torch.Tensor:
        """[B, num_frames, H, W] frames in [0, 1], or their ``measure`` (a dict: a stage-2 run whose
        encoder is fixed measures each training scan once, ``--feature_cache``) -> [B, (num_frames - 1) * 6]."""
        measurements = frames if isinstance(frames, dict) else self.measure(frames)
        steps, encoder_params = self.window_steps(measurements)
        return self.decode(steps, encoder_params).reshape(len(steps), -1)

    def measure(self, frames: torch.Tensor) -> dict:
        """What a window's frames give before anything learned after the encoder.

        Args:
            frames: [B, num_frames, H, W] frames in [0, 1].
        Returns:
            ``{"grids": {offset k: [B, L - k, G] decorrelation_grid of each pair (a, a + k)},
            "params": [B, L - 1, 6] the encoder's prediction of each consecutive pair,
            "thumbnails": [B, L, 60, 80]}``: every value indexed by the window's frames (pairs by
            their first frame), so a scan's ``measure_scan`` sliced at a window is this.
        """
        if frames.ndim != 4 or frames.shape[1] != self.num_frames:
            raise InputError(f"SeqFlowNet takes [B, {self.num_frames}, H, W] windows of frames; got {tuple(frames.shape)}")
        batch, length = frames.shape[:2]
        measurements = {"grids": {}}
        for offset in self.offsets:
            first = frames[:, :-offset].flatten(0, 1)
            second = frames[:, offset:].flatten(0, 1)
            values = self._encode_pairs(lambda a, b: torch.stack([first[a:b], second[a:b]], dim=1), len(first), offset)
            measurements["grids"][offset] = self._grid(values).reshape(batch, length - offset, -1)
            if offset == 1:
                measurements["params"] = values["params"].float().reshape(batch, length - 1, 6)
        measurements["thumbnails"] = torch.nn.functional.adaptive_avg_pool2d(frames.float(), THUMBNAIL)
        return measurements

    def window_steps(self, measurements: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of windows' ``measure`` -> the temporal model's inputs ``(steps [B, L-1, F],
        encoder_params [B, L-1, 6])``, each window on its own."""
        thumbnails = measurements["thumbnails"]
        batch, length = thumbnails.shape[:2]
        looks = self._looks(thumbnails.flatten(0, 1)).reshape(batch, length, -1)
        features = {"grids": measurements["grids"], "params": measurements["params"], "looks": looks}
        return self._assemble(features, torch.zeros(batch, 1, dtype=torch.long, device=thumbnails.device), length)

    @staticmethod
    def _grid(values: dict) -> torch.Tensor:
        return decorrelation_grid(values["peak"].float(), values["position"].float())

    @torch.no_grad()
    def measure_scan(self, scan: torch.Tensor) -> dict:
        """``measure`` of a whole scan as one sequence, each frame pair measured once.

        Args:
            scan: uint8 [N, H, W] frames (on the model's device); only ``ENCODER_CHUNK`` frame pairs
                exist as floats at a time.
        Returns:
            ``measure``'s dict for B = 1, L = N (the grids of offset k hold N - k pairs).
        """
        length = scan.shape[0]
        measurements = {"grids": {}}
        for offset in self.offsets:
            def pairs_between(a, b, k=offset):
                return torch.stack([scan[a:b], scan[a + k:b + k]], dim=1).float().div_(255)

            values = self._encode_pairs(pairs_between, length - offset, offset)
            measurements["grids"][offset] = self._grid(values)[None]
            if offset == 1:
                measurements["params"] = values["params"].float()[None]
        measurements["thumbnails"] = torch.cat([
            torch.nn.functional.adaptive_avg_pool2d(scan[a:a + ENCODER_CHUNK].float().div_(255), THUMBNAIL)
            for a in range(0, length, ENCODER_CHUNK)])[None]
        return measurements

    @torch.no_grad()
    def scan_features(self, scan: torch.Tensor) -> dict:
        """Everything a whole scan's windows need (``window_inputs``), each frame pair measured once.

        Args:
            scan: uint8 [N, H, W] frames (on the model's device).
        """
        return self.features_of(self.measure_scan(scan))

    @torch.no_grad()
    def features_of(self, measurements: dict) -> dict:
        """``scan_features`` from a scan's ``measure_scan`` (e.g. kept by ``--feature_cache``): only the
        learned part after the encoder is computed."""
        thumbnails = measurements["thumbnails"][0]
        looks = torch.cat([self._looks(thumbnails[a:a + ENCODER_CHUNK]) for a in range(0, len(thumbnails), ENCODER_CHUNK)])
        return {"grids": measurements["grids"], "params": measurements["params"], "looks": looks[None]}

    def window_inputs(self, features: dict, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The temporal model's inputs ``(steps [W, L-1, F], encoder_params [W, L-1, 6])`` of the windows
        of ``num_frames`` frames starting at ``starts`` (long [W]) of a scan's ``scan_features``:
        exactly what ``window_steps`` computes from those windows' frames."""
        return self._assemble(features, starts[None], self.num_frames)


@register_model("seq_flow")
def seq_flow(in_frames: int, pred_dim: int, pixel_mm=(1.0, 1.0), patch_size: int = 64, num_patches: int = 32,
             radius: int = 8, robust_iterations: int = 0, patch_selection: str = "speckle", offsets=(1, 2, 4),
             hidden: int = 64, appearance_dim: int = 32, freeze_encoder: bool = True) -> nn.Module:
    """SeqFlowNet: [B, in_frames, H, W] -> [B, (in_frames - 1) * 6] local ``parameter`` predictions."""
    if pred_dim != 6 * (in_frames - 1):
        raise InputError(f"seq_flow predicts the 6 parameters of every consecutive pair of its window "
                         f"(window_pairs=consecutive, PRED_TYPE=parameter): pred_dim must be 6 x (NUM_SAMPLES - 1) = "
                         f"{6 * (in_frames - 1)}, got {pred_dim}")
    return SeqFlowNet(in_frames, pixel_mm=pixel_mm, patch_size=patch_size, num_patches=num_patches, radius=radius,
                      robust_iterations=robust_iterations, patch_selection=patch_selection, offsets=offsets,
                      hidden=hidden, appearance_dim=appearance_dim, freeze_encoder=freeze_encoder)
