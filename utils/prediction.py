"""Whole-scan inference: run a pose network over a scan's windows and give every frame a transform.

The network was trained on windows of ``num_samples`` frames; for each row ``(a, b)`` of
``pairs = pair_samples(num_samples, num_pred)`` it predicts ``T_{a<-b}`` (frame b's image mm ->
frame a's image mm, positions within the window) as ``pred_type`` values. At inference the windows
are consecutive frames ``s .. s + num_samples - 1``, so window s pair (a, b) is the scan edge
``T_{s+a <- s+b}``. ``window_plan`` picks, for every frame, one edge that attaches it to a frame
placed before it (a spanning tree rooted at frame 0), and which windows must run for those edges;
``predict_scan_transforms`` runs only those windows, batched, and composes the edges into
``T_{0<-i}`` (global) and ``T_{i-1<-i}`` (local) for every frame i = 1..N-1.

The baseline strides windows and leaves the last frames of the scan at the previous pose when
``NUM_SAMPLES > 2``; here every frame gets its own predicted transform.

A sequence model predicts every consecutive pair of its window (``window_pairs="consecutive"``):
its windows overlap by half (``sequence_windows``) and each local transform is taken from the
window where it lies nearest the middle, with as much context before it as after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from utils.errors import InputError
from utils.transform import (
    PRED_TYPES,
    invert_rigid,
    chain_local_transforms,
    points_to_matrix,
    prediction_to_matrix,
    type_dim,
)
from utils.transform import window_pairs as window_pairs_of


@dataclass(frozen=True)
class WindowPlan:
    """Which windows to run and which predicted edge places each frame (row k is frame k + 1).

    Attributes:
        num_frames: N, frames in the scan.
        num_samples: frames per window.
        starts: long [W], first frame of each window to run, ascending; window w is frames
            ``starts[w] .. starts[w] + num_samples - 1``.
        window: long [N-1], for frame i (row i-1): index into ``starts`` of the window it uses.
        pair: long [N-1], the row of ``pairs`` in that window.
        parent: long [N-1], the already-placed frame p the edge connects frame i to:
            ``T_{0<-i} = T_{0<-p} @ T_{p<-i}``.
        inverted: bool [N-1], False when the pair predicts ``T_{p<-i}`` directly (frame i is the
            pair's moving frame), True when it predicts ``T_{i<-p}`` and is inverted.
    """

    num_frames: int
    num_samples: int
    starts: torch.Tensor
    window: torch.Tensor
    pair: torch.Tensor
    parent: torch.Tensor
    inverted: torch.Tensor

    @property
    def num_windows(self) -> int:
        return len(self.starts)


def window_plan(num_frames: int, num_samples: int, pairs) -> WindowPlan:
    """Plan the windows and edges that give every frame 1..N-1 a transform to frame 0.

    Rule. Frames are placed in increasing order, frame 0 first (identity). Frame i is attached to
    the *nearest already-placed earlier frame* it has a predicted pair with: among all windows s
    (``0 <= s <= N - num_samples``) and pairs (a, b) with ``s + b == i`` whose reference frame
    ``s + a`` is placed, the largest ``s + a``. For ``pair_samples`` this is always the local pair
    (i-1, i) once i >= num_samples - num_pred (for NUM_SAMPLES=2: window i-1).

    Frames that are never the moving frame of a pair (1 .. num_samples-num_pred-1 when
    NUM_PRED < NUM_SAMPLES-1) wait; they are placed from the first later frame placed that has a
    pair with them as reference, by inverting that pair (``T_{k<-i} = T_{i<-k}^-1``). For
    ``pair_samples`` that frame is k0 = num_samples - num_pred, which is itself placed from frame 0
    by pair (0, k0) of window 0 (its nearer references are the waiting frames).

    Ties (the same edge predicted by several windows) go to a window already chosen, else to the
    window starting latest, which covers the most frames still to come: the plan runs only the
    windows it needs (about (N - num_samples) / num_pred + 1 for ``pair_samples``, all N - 1 for
    NUM_SAMPLES=2).

    Args:
        num_frames: N, frames in the scan.
        num_samples: frames per window.
        pairs: [M, 2] ``(a, b)`` positions within a window, ``0 <= a < b < num_samples``; the network
            predicts ``T_{a<-b}`` for row m (``pair_samples`` order).
    Raises:
        ValueError: N < num_samples, malformed pairs, or pairs that cannot reach every frame.
    """
    num_frames, num_samples = int(num_frames), int(num_samples)
    pair_list = [tuple(int(v) for v in row) for row in torch.as_tensor(pairs).reshape(-1, 2).tolist()]
    if not pair_list or any(not 0 <= a < b < num_samples for a, b in pair_list):
        raise InputError(f"pairs {pair_list} must be (a, b) with 0 <= a < b < num_samples={num_samples}")
    if num_frames < num_samples:
        raise InputError(f"a scan of {num_frames} frames is shorter than one window of NUM_SAMPLES={num_samples}")
    last_start = num_frames - num_samples

    placed = [False] * num_frames
    placed[0] = True
    edge = [None] * num_frames  # frame -> (start, pair row, parent, inverted)
    chosen: set[int] = set()

    def best_edge(i: int):
        """Nearest placed partner of frame i: ((start, row, partner, inverted) or None)."""
        best_distance, candidates = None, []
        for row, (a, b) in enumerate(pair_list):
            for position, inverted in ((b, False), (a, True)):
                start = i - position
                if not 0 <= start <= last_start:
                    continue
                partner = start + (b if inverted else a)
                if not placed[partner]:
                    continue
                # distance first, then a direct edge over an inverted one
                key = (abs(i - partner), inverted)
                if best_distance is None or key < best_distance:
                    best_distance, candidates = key, [(start, row, partner, inverted)]
                elif key == best_distance:
                    candidates.append((start, row, partner, inverted))
        if not candidates:
            return None
        # A window already running costs nothing; otherwise the latest start reaches furthest ahead.
        return max(candidates, key=lambda c: (c[0] in chosen, c[0], -c[1]))

    def place(i: int, choice) -> None:
        edge[i] = choice
        placed[i] = True
        chosen.add(choice[0])

    waiting: list[int] = []
    for i in range(1, num_frames):
        choice = best_edge(i)
        if choice is None:
            waiting.append(i)
            continue
        place(i, choice)
        # Frame i may be the first placed partner of waiting frames (inverted edges), and placing
        # one waiting frame may unblock another.
        progress = True
        while waiting and progress:
            progress = False
            for j in list(waiting):
                choice = best_edge(j)
                if choice is not None:
                    place(j, choice)
                    waiting.remove(j)
                    progress = True
    if waiting:
        raise InputError(f"pairs {pair_list} with NUM_SAMPLES={num_samples} give frames {waiting[:10]} of a "
                         f"{num_frames}-frame scan no path to frame 0")

    starts = sorted(chosen)
    window_of = {start: w for w, start in enumerate(starts)}
    rows = edge[1:]
    return WindowPlan(
        num_frames=num_frames,
        num_samples=num_samples,
        starts=torch.tensor(starts, dtype=torch.long),
        window=torch.tensor([window_of[e[0]] for e in rows], dtype=torch.long),
        pair=torch.tensor([e[1] for e in rows], dtype=torch.long),
        parent=torch.tensor([e[2] for e in rows], dtype=torch.long),
        inverted=torch.tensor([e[3] for e in rows], dtype=torch.bool),
    )


def compose_plan(edges: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Global transforms from per-frame edges of a tree rooted at frame 0.

    Args:
        edges: [N-1, 4, 4] ``T_{parent(i)<-i}`` for frames i = 1..N-1.
        parent: long [N-1], ``parent(i)`` in 0..N-1 (acyclic, reaching frame 0).
    Returns:
        [N-1, 4, 4] ``T_{0<-i}``. Pointer jumping (the tree form of a prefix scan): every round
        replaces each frame's edge by its composition with its parent's, halving the remaining
        depth, so a 1500-frame chain takes 11 batched matmuls instead of 1500 sequential ones.
    """
    eye = torch.eye(4, dtype=edges.dtype, device=edges.device)[None]
    tform = torch.cat([eye, edges])  # tform[k] = T_{up[k] <- k}; frame 0 is the root (identity)
    up = torch.cat([torch.zeros(1, dtype=torch.long, device=parent.device), parent.to(torch.long)])
    for _ in range(max(1, math.ceil(math.log2(len(up)))) + 1):
        if not bool((up != 0).any()):
            return tform[1:]
        tform = tform[up] @ tform
        up = up[up]
    raise AssertionError("the plan's parent links contain a cycle")  # window_plan never builds one


def sequence_windows(num_frames: int, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping windows for a network that predicts every consecutive pair of its window, and
    which window predicts each step.

    Windows of ``num_samples`` frames start every ``(num_samples - 1) // 2`` frames (at least 1),
    the last one at ``N - num_samples`` so the scan's end is covered; step i (the local transform
    of frame i, i = 1..N-1) is the pair ``(i-1-s, i-s)`` of a window starting at s, and is taken
    from the window where it lies nearest the middle (the earlier one on a tie): a sequence model
    predicts best where it sees as much before a step as after it.

    Returns:
        ``(starts long [W], window long [N-1])``: first frame of each window, ascending; for step i
        (row i-1) the index into ``starts`` of its window.
    Raises:
        ValueError: N < num_samples.
    """
    num_frames, num_samples = int(num_frames), int(num_samples)
    if num_frames < num_samples:
        raise InputError(f"a scan of {num_frames} frames is shorter than one window of NUM_SAMPLES={num_samples}")
    stride = max(1, (num_samples - 1) // 2)
    starts = list(range(0, num_frames - num_samples + 1, stride))
    if starts[-1] != num_frames - num_samples:
        starts.append(num_frames - num_samples)
    starts = torch.tensor(starts, dtype=torch.long)
    position = torch.arange(num_frames - 1)[:, None] - starts[None, :]  # step row k = i - 1 in each window
    inside = (position >= 0) & (position <= num_samples - 2)
    off_centre = (position - (num_samples - 2) / 2).abs().masked_fill(~inside, float("inf"))
    return starts, off_centre.argmin(dim=1)  # argmin takes the first (earlier) window on a tie


def _frames_on(frames, device: torch.device) -> torch.Tensor:
    """One uint8 [N, h, w] copy of the scan on ``device``."""
    if isinstance(frames, torch.Tensor):
        tensor = frames
    else:
        array = np.asarray(frames)
        if not array.flags.writeable:
            array = array.copy()  # torch.from_numpy warns about (and may not share) read-only memory
        tensor = torch.from_numpy(array)
    if tensor.ndim != 3 or tensor.dtype != torch.uint8:
        raise InputError(f"frames must be uint8 [N, h, w]; got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor.to(device)


def predict_scan_transforms(
    model: torch.nn.Module,
    frames,
    *,
    num_samples: int,
    num_pred: int,
    pred_type: str,
    image_points_mm: torch.Tensor | None,
    device,
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    window_pairs: str = "baseline",
    measurements: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict every frame's global and local transform of one scan.

    Args:
        model: the pose network, already on ``device``; input [B, num_samples, h, w] float32 frames
            / 255, output [B, num_pairs * D] (``pair_samples(num_samples, num_pred)`` order, D values
            per pair: 6 parameter, 12 transform, 7 quaternion, 3*P point laid out [3, P] row-major).
            Run in eval mode under ``torch.inference_mode``; its train/eval mode is restored after.
        frames: uint8 [N, h, w] numpy array or tensor, already down-sampled like the training input.
        num_samples, num_pred: the window and pairs the model was trained with (NUM_SAMPLES, NUM_PRED).
        pred_type: one of ``PRED_TYPES``.
        image_points_mm: [4, P] (or [3, P]) reference points in image mm (``S @ image_corners``), the
            points a ``point`` prediction moves; unused (may be None) for the other types.
        device: where the network runs; the scan is uploaded there once and windows are gathered
            on the device, one batch at a time.
        batch_size: windows per forward pass.
        amp_dtype: e.g. ``torch.float16`` to run under ``torch.autocast`` on ``device``; None for
            full precision.
        progress: show a tqdm bar over the batches.
        window_pairs: ``"baseline"`` (the pairs of ``pair_samples``, planned by ``window_plan``) or
            ``"consecutive"`` (every local pair of the window, ``consecutive_pairs``; overlapping
            windows, each step from the window it is most central in, ``sequence_windows``).
        measurements: ``"consecutive"`` with a network that has ``features_of`` (``seq_flow``) only:
            the scan's ``measure_scan`` already made (``--feature_cache``), used instead of measuring
            ``frames`` again (then only their number is read).
    Returns:
        ``(global, local)``, each float64 [N-1, 4, 4] on the CPU, row i-1 for frame i: global
        ``T_{0<-i}``, local ``T_{i-1<-i} = T_{0<-i-1}^-1 T_{0<-i}`` (exactly the predicted edge where
        frame i was placed from frame i-1). All geometry after the network runs in float64.
    Raises:
        ValueError: bad arguments, a model output of the wrong width, or non-finite outputs (naming
            the first affected scan window).
    """
    device = torch.device(device)
    if pred_type not in PRED_TYPES:
        raise InputError(f"pred_type={pred_type!r} is not one of {list(PRED_TYPES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r} must be a positive integer")
    if measurements is not None and (window_pairs != "consecutive" or not hasattr(model, "features_of")):
        raise InputError(f"measurements of a scan are what a sequence network with features_of reads (seq_flow); "
                         f"got {type(model).__name__} with window_pairs={window_pairs!r}")
    if window_pairs == "consecutive":
        return _predict_sequence_scan(model, frames, num_samples=num_samples, num_pred=num_pred, pred_type=pred_type,
                                      image_points_mm=image_points_mm, device=device, batch_size=batch_size,
                                      amp_dtype=amp_dtype, progress=progress, measurements=measurements)
    pairs = window_pairs_of(window_pairs, num_samples, num_pred)
    num_pairs = len(pairs)
    reference_points, num_points = _reference_points(pred_type, image_points_mm)
    values_per_pair = type_dim(pred_type, num_points, 1)
    width = num_pairs * values_per_pair

    scan = _frames_on(frames, device)
    plan = window_plan(len(scan), num_samples, pairs)
    num_windows = plan.num_windows
    starts = plan.starts.to(device)
    offsets = torch.arange(num_samples, device=device)

    outputs = None
    batches = range(0, num_windows, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=math.ceil(num_windows / batch_size), desc="windows", unit="batch")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for first in batches:
                index = starts[first : first + batch_size, None] + offsets  # [B, num_samples] frame indices
                batch = scan[index].float().div_(255)  # only this batch exists as float
                out = model(batch)
                if out.ndim != 2 or out.shape != (len(index), width):
                    raise InputError(
                        f"model output {tuple(out.shape)} for {len(index)} windows; expected "
                        f"[{len(index)}, {width}] = {num_pairs} pairs x {values_per_pair} {pred_type!r} values "
                        f"(NUM_SAMPLES={num_samples}, NUM_PRED={num_pred})"
                    )
                if outputs is None:
                    # float64 outputs (e.g. an exact test double) keep their precision; AMP outputs widen.
                    dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
                    outputs = torch.empty(num_windows, width, dtype=dtype, device=device)
                outputs[first : first + len(index)] = out
    finally:
        model.train(was_training)

    # One device -> host copy for the whole scan (a sync point), then float64 geometry on the CPU.
    # copy=True: a float64 CPU output would otherwise stay an inference tensor, which refuses in-place ops.
    outputs = outputs.to("cpu", torch.float64, copy=True)
    finite = torch.isfinite(outputs).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite)[:, 0]
        start = int(plan.starts[bad[0]])
        raise InputError(
            f"the model's output is not finite for scan window {start} (frames {start}..{start + num_samples - 1}); "
            f"{len(bad)} of {num_windows} windows affected"
        )

    values = outputs.reshape(num_windows, num_pairs, values_per_pair)[plan.window, plan.pair]  # [N-1, D]
    edges = _values_to_edges(values, pred_type, reference_points, num_points)
    # A free `transform` prediction is not orthonormal: only a general inverse undoes it.
    invert = torch.linalg.inv if pred_type == "transform" else invert_rigid
    if bool(plan.inverted.any()):
        edges = edges.clone()
        edges[plan.inverted] = invert(edges[plan.inverted])

    global_tforms = compose_plan(edges, plan.parent)
    previous = torch.cat([torch.eye(4, dtype=torch.float64)[None], global_tforms[:-1]])
    local_tforms = invert(previous) @ global_tforms
    frame = torch.arange(1, plan.num_frames)
    direct_local = (plan.parent == frame - 1) & ~plan.inverted
    local_tforms = torch.where(direct_local[:, None, None], edges, local_tforms)

    _check_finite_transforms(global_tforms, local_tforms)
    return global_tforms, local_tforms


def _reference_points(pred_type: str, image_points_mm) -> tuple[torch.Tensor | None, int]:
    """``(reference points float64 [4, P] on the CPU or None, P)``: what a ``point`` prediction moves."""
    if pred_type != "point":
        return None, 4
    if image_points_mm is None:
        raise InputError("pred_type='point' needs image_points_mm, the [4, P] reference points in image mm")
    reference_points = torch.as_tensor(image_points_mm).to(device="cpu", dtype=torch.float64)
    return reference_points, reference_points.shape[-1]


def _check_finite_transforms(global_tforms: torch.Tensor, local_tforms: torch.Tensor) -> None:
    finite = torch.isfinite(global_tforms).flatten(1).all(dim=1) & torch.isfinite(local_tforms).flatten(1).all(dim=1)
    if not bool(finite.all()):
        first_bad = int(torch.nonzero(~finite)[0, 0]) + 1
        raise InputError(f"the predicted transform of frame {first_bad} is not finite (e.g. a zero quaternion or "
                         f"a singular 'transform' prediction)")


def _values_to_edges(values: torch.Tensor, pred_type: str, reference_points, num_points: int) -> torch.Tensor:
    """Per-pair prediction values [M, D] -> [M, 4, 4] transforms."""
    if pred_type == "point":
        return points_to_matrix(values.reshape(len(values), 3, num_points), reference_points)
    return prediction_to_matrix(values, pred_type)


def map_tensors(function, value):
    """``function`` applied to every tensor of a nested dict of tensors (a network's measurements)."""
    if isinstance(value, dict):
        return {key: map_tensors(function, item) for key, item in value.items()}
    return function(value)


def _predict_sequence_scan(model, frames, *, num_samples, num_pred, pred_type, image_points_mm, device, batch_size,
                           amp_dtype, progress, measurements=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``predict_scan_transforms`` for ``window_pairs="consecutive"``: every step from the overlapping
    window it is most central in (``sequence_windows``).

    A network with ``scan_features``, ``window_inputs`` and ``decode`` (``seq_flow``) measures every
    frame pair of the scan once and runs only its temporal part per window (``batch_size`` windows
    per call), with exactly the numbers it would compute from each window's frames; any other runs
    whole windows of frames, ``batch_size`` at a time. ``measurements`` (the scan's ``measure_scan``,
    on any device) skip the measuring.
    """
    window_pairs_of("consecutive", num_samples, num_pred)  # validates num_pred
    reference_points, num_points = _reference_points(pred_type, image_points_mm)
    values_per_pair = type_dim(pred_type, num_points, 1)
    steps = num_samples - 1
    scan = _frames_on(frames, device) if measurements is None else None
    num_frames = len(frames)
    if measurements is not None and measurements["thumbnails"].shape[1] != num_frames:
        raise InputError(f"measurements of {measurements['thumbnails'].shape[1]} frames for a scan of {num_frames}")
    starts, window = sequence_windows(num_frames, num_samples)
    fast = all(hasattr(model, name) for name in ("scan_features", "window_inputs", "decode"))
    batches = range(0, len(starts), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=math.ceil(len(starts) / batch_size), desc="windows", unit="batch")
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if measurements is not None:
                features = model.features_of(map_tensors(lambda tensor: tensor.to(device), measurements))
            elif fast:
                features = model.scan_features(scan)
            for first in batches:
                chosen = starts[first:first + batch_size].to(device)
                if fast:
                    out = model.decode(*model.window_inputs(features, chosen)).reshape(len(chosen), -1)
                else:
                    index = chosen[:, None] + torch.arange(num_samples, device=device)
                    out = model(scan[index].float().div_(255))
                if out.ndim != 2 or out.shape != (len(chosen), steps * values_per_pair):
                    raise InputError(f"model output {tuple(out.shape)} for {len(chosen)} windows; expected "
                                     f"[{len(chosen)}, {steps * values_per_pair}] = {steps} consecutive pairs x "
                                     f"{values_per_pair} {pred_type!r} values (NUM_SAMPLES={num_samples})")
                outputs.append(out.to("cpu", torch.float64, copy=True))
    finally:
        model.train(was_training)
    outputs = torch.cat(outputs).reshape(len(starts), steps, values_per_pair)
    position = torch.arange(num_frames - 1) - starts[window]
    values = outputs[window, position]  # [N-1, D]
    finite = torch.isfinite(values).all(dim=1)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0, 0])
        start = int(starts[window[bad]])
        raise InputError(f"the model's output is not finite for scan window {start} (frames {start}.."
                         f"{start + num_samples - 1}); {int((~finite).sum())} of {len(values)} steps affected")
    local_tforms = _values_to_edges(values, pred_type, reference_points, num_points)
    global_tforms = chain_local_transforms(local_tforms)
    _check_finite_transforms(global_tforms, local_tforms)
    return global_tforms, local_tforms
