"""Options of ``train.py``: defaults are the official TUS-REC 2025 baseline's settings.

Each field's ``aliases`` keep the baseline's flag spellings (``--NUM_SAMPLES``, ``--PRED_TYPE``, ...)
so commands from the challenge README run unchanged. Variants live in ``options/presets/*.yaml``.
"""

from __future__ import annotations

import dataclasses
import re

from options.core import option
from utils.errors import InputError

# Hard-coded rather than read from the models registry: options must not import model code.
MODEL_NAMES = ("efficientnet_b1", "efficientnet_b0", "resnet18", "patch_flow", "seq_flow")
WINDOW_PAIRS = ("baseline", "consecutive")  # utils.transform.WINDOW_PAIRS, without importing torch
LOSS_DOFS = ("all", "in_plane")
LOSS_KINDS = ("mse", "l1", "l1_oop_mse")
BEST_METRICS = ("val_dist", "val_GPE")

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclasses.dataclass
class TrainOptions:
    """Train a network that predicts the transforms between ultrasound frames from the images."""

    # --- data -------------------------------------------------------------------------------
    data_path: str = option(
        "data",
        "dataset root in either challenge layout (train: frames_transfs/, or frames/ + transfs/); "
        "the baseline's data/frames_transfs is accepted too",
        aliases=("DATA_PATH",),
    )
    calib_file: str | None = option(
        None, "calibration CSV; none = <data_path>/calib_matrix.csv", aliases=("FILENAME_CALIB",)
    )
    landmark_path: str | None = option(
        None, "folder of landmark_<NNN>.h5 files; none = found in the data root", aliases=("LANDMARK_PATH",)
    )

    # --- what the network predicts and what it is compared with -----------------------------
    pred_type: str = option(
        "parameter",
        "network output per pair of frames",
        choices=("parameter", "transform", "quaternion", "point"),
        aliases=("PRED_TYPE",),
    )
    label_type: str = option(
        "point",
        "label the loss compares the prediction with, per pair of frames",
        choices=("point", "parameter", "transform"),
        aliases=("LABEL_TYPE",),
    )
    num_samples: int = option(2, "frames per input window", aliases=("NUM_SAMPLES",))
    sample_range: int = option(
        2, "span in frames from which the window's frames are drawn", aliases=("SAMPLE_RANGE",)
    )
    num_pred: int = option(
        1, "transforms predicted per window (pairs of its frames)", aliases=("NUM_PRED",)
    )
    window_pairs: str = option(
        "baseline",
        "pairs of a window the network predicts: baseline (each of the last NUM_PRED frames with every "
        "earlier one) or consecutive (every frame after the first from the one before it, NUM_PRED = "
        "NUM_SAMPLES - 1: a sequence model's local transforms)",
        choices=WINDOW_PAIRS,
    )
    model_name: str = option(
        "efficientnet_b1",
        "network architecture (patch_flow: full-resolution patches and a rigid in-plane fit, 2 frames, "
        "parameter prediction and label; seq_flow: patch_flow's measurements of every pair, frame "
        "appearance and a bidirectional GRU over a window, consecutive pairs)",
        choices=MODEL_NAMES,
    )
    seq_offsets: list[int] = option(
        [1, 2, 4],
        "seq_flow only: frame distances k of the pairs (i, i+k) whose speckle decorrelation it measures "
        "(1 must be among them: it also gives the in-plane motion)",
    )
    seq_hidden: int = option(64, "seq_flow only: width of its GRU (per direction)")
    seq_appearance_dim: int = option(
        32, "seq_flow only: size of the learned appearance vector of each frame's thumbnail; 0 = none, only "
            "the frames' brightness moments (where the echoes are)")
    freeze_encoder: bool = option(
        True,
        "seq_flow only: keep its patch_flow encoder fixed (stage 2 of training, after --init_weights of a "
        "patch_flow checkpoint); false trains it too",
    )
    feature_cache: bool = option(
        False,
        "seq_flow with a fixed encoder only: measure every training and validation scan once with the encoder "
        "and train on windows of those measurements (hundreds of windows a second on a CPU instead of one); "
        "no frame augmentation then (reversed, strided or mirrored windows measure differently)",
    )
    accumulated_loss_weight: float = option(
        0.0,
        "window_pairs=consecutive only: weight of a second loss term, the distance between the image "
        "corners placed by the predicted and the true transforms from the window's first frame (local "
        "transforms accumulated), over no motion's; 0 = local transforms only",
    )
    label_norm: bool = option(
        False,
        "divide each DOF of the parameter label by its spread over the training fold in the loss, so a "
        "rotation in radians and a translation in mm weigh the same (the statistics are stored in the "
        "checkpoint; networks with an output scale take it from them)",
    )
    patch_size: int = option(
        64, "patch_flow only: side of the full-resolution patches it correlates, pixels (a multiple of 8)"
    )
    num_patches: int = option(
        32, "patch_flow only: patches of each pair that it measures and fits (patch_selection picks them)"
    )
    search_radius: int = option(
        8,
        "patch_flow only: the largest displacement between two frames that it looks for, pixels (each "
        "axis); the patches must be more than 4 times as large",
    )
    patch_selection: str = option(
        "speckle",
        "patch_flow only: which squares it measures: speckle (full of signal, of the frame's typical "
        "contrast: tissue that moves with the probe) or texture (the most varied: bright interfaces, "
        "whose echo also slides when the probe moves out of plane)",
        choices=("speckle", "texture"),
    )
    robust_iterations: int = option(
        0,
        "patch_flow only: Tukey-biweight re-weighting passes of its rigid fit, in training and prediction, "
        "so patches that matched the wrong place stop pulling the fit; 0 = the plain weighted fit",
    )
    loss_dofs: str = option(
        "all",
        "DOFs of the parameter label the loss compares: all 6, or in_plane (a_Z, t_x, t_y) for a network "
        "that predicts no out-of-plane motion",
        choices=LOSS_DOFS,
    )

    loss: str = option(
        "mse",
        "mse (the baseline's), l1 (mean absolute error, weighted per DOF by the square root of the MSE "
        "weight: what the TUS-REC errors average is a distance, not its square, and a few pairs that "
        "failed to match do not dominate it) or l1_oop_mse (parameter labels: l1 on the in-plane DOFs, "
        "the squared error on the out-of-plane ones, whose direction is uncertain: its minimiser is the "
        "mean over both directions, a prediction shrunk by the doubt, where the absolute error's is the "
        "likelier direction in full)",
        choices=LOSS_KINDS,
    )

    # --- optimisation -----------------------------------------------------------------------
    minibatch_size: int = option(16, "windows per optimiser step", aliases=("MINIBATCH_SIZE",))
    learning_rate: float = option(1e-4, "learning rate", aliases=("LEARNING_RATE",))
    num_epochs: int = option(
        100000000,
        "epochs to train (the baseline trains until stopped); an epoch = samples_per_scan windows from "
        "every training scan",
        aliases=("NUM_EPOCHS",),
    )
    optimizer: str = option("adam", "optimiser", choices=("adam", "adamw"))
    weight_decay: float = option(0.0, "weight decay of the optimiser")
    lr_schedule: str = option(
        "constant", "learning-rate schedule after the warm-up", choices=("constant", "cosine")
    )
    warmup_steps: int = option(0, "optimiser steps of linear learning-rate warm-up; 0 = none")
    grad_clip: float = option(0.0, "clip the gradient norm to this value; 0 = off")
    identity_init: bool = option(
        False,
        "start the output layer at zero weights with the bias of 'no motion', so the untrained network "
        "predicts identity instead of random motions of ~0.3 rad (off in the baseline, which keeps "
        "torchvision's initialisation)",
    )
    max_steps: int | None = option(None, "stop after this many optimiser steps in total; none = no limit")
    seed: int = option(0, "random seed (each distributed rank adds its rank)")

    # --- logging, saving, validation --------------------------------------------------------
    freq_info: int = option(10, "epochs between summary lines in the log", aliases=("FREQ_INFO",))
    freq_save: int = option(
        100, "epochs between writes of last.pt (it is also written at the end of the run)", aliases=("FREQ_SAVE",)
    )
    val_fre: int = option(1, "epochs between validations")
    val_scan_every: int = option(
        10, "epochs between whole-scan GPE/LPE of the validation scans; 0 = never"
    )
    best_metric: str = option(
        "val_dist",
        "what best.pt is the lowest of: val_dist (the point distance of the validation windows' pairs, every "
        "validation) or val_GPE (the whole validation scans' GPE, every val_scan_every epochs: a sequence "
        "model's drift over whole scans, which its windows do not show)",
        choices=BEST_METRICS,
    )
    save_every_steps: int = option(
        0, "also write last.pt every this many optimiser steps; 0 = only per freq_save and at the end"
    )
    log_every_steps: int = option(50, "optimiser steps between progress lines when not attached to a terminal")
    name: str | None = option(None, "run folder name; none = the preset's name, or 'train'")
    out_dir: str = option("results", "root of the numbered run folders <NNN>-<name>")

    # --- hardware ---------------------------------------------------------------------------
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    num_workers: int = option(8, "DataLoader worker processes (the baseline's 8)")
    amp: bool = option(True, "mixed precision (only used on CUDA)")
    amp_dtype: str = option("bfloat16", "mixed-precision dtype", choices=("bfloat16", "float16"))
    inference_batch_size: int = option(32, "windows per forward pass when predicting whole scans")

    # --- splits -----------------------------------------------------------------------------
    num_folds: int = option(5, "folds the subjects are split into")
    split_seed: int = option(4, "seed of the subject shuffle before splitting (the baseline's random.Random(4))")
    train_folds: list[int] = option([0, 1, 2], "folds used for training")
    val_folds: list[int] = option([3], "folds used for validation")
    test_folds: list[int] = option([4], "folds held out for testing")
    folds_file: str | None = option(None, "folds JSON to reuse instead of splitting; none = split")

    # --- sampling and augmentation ----------------------------------------------------------
    samples_per_scan: int = option(1, "windows drawn from each training scan per epoch (the baseline draws 1)")
    val_samples_per_scan: int = option(
        1, "fixed windows per validation scan, the same at every validation"
    )
    downsample: int = option(1, "integer factor of area down-sampling of the frames; 1 = full resolution")
    cache_dir: str | None = option(None, "folder of an on-disk cache of down-sampled scans and, with feature_cache, "
                                         "of each scan's measurements; none = no cache")
    reverse_prob: float = option(0.0, "probability of reversed playback augmentation")
    max_stride: int = option(1, "largest random stride between a window's frames (1..max_stride)")
    flip_prob: float = option(
        0.0, "probability of mirroring a window left-right, its poses mirrored so the labels stay its true motion"
    )
    gain_jitter: float = option(0.0, "a window's frames are multiplied by a gain uniform in 1 +- this (0 = off)")

    def validate(self) -> None:
        """Raise ValueError listing every invalid value or combination, with what is allowed."""
        # Imported here: utils.transform loads torch (seconds), and reading or writing presets needs none.
        from utils.transform import check_pred_label

        problems = []
        try:
            check_pred_label(self.pred_type, self.label_type)
        except ValueError as exc:
            problems.append(str(exc))
        if self.best_metric == "val_GPE" and not self.val_scan_every:
            problems.append("best_metric='val_GPE' needs whole validation scans: val_scan_every > 0 (got 0)")
        if (self.label_norm or self.loss_dofs != "all" or self.loss == "l1_oop_mse") and self.label_type != "parameter":
            problems.append(f"label_norm={self.label_norm}, loss_dofs={self.loss_dofs!r}, loss={self.loss!r}: per-DOF "
                            f"losses need label_type='parameter' (got {self.label_type!r})")
        if self.model_name == "patch_flow" and (self.num_samples, self.num_pred, self.pred_type) != (2, 1, "parameter"):
            problems.append(f"model_name='patch_flow' predicts one pair's parameters: it needs num_samples=2, "
                            f"num_pred=1, pred_type='parameter' (got {self.num_samples}, {self.num_pred}, "
                            f"{self.pred_type!r})")
        problems += self._patch_flow_problems()
        problems += self._sequence_problems()
        if self.num_samples < 2:
            problems.append(f"num_samples={self.num_samples}: a window needs at least 2 frames")
        if self.sample_range < self.num_samples:
            problems.append(
                f"sample_range={self.sample_range}: must be >= num_samples={self.num_samples} "
                "(the window's frames are drawn from it)"
            )
        if not 1 <= self.num_pred <= self.num_samples - 1:
            problems.append(
                f"num_pred={self.num_pred}: must be in 1..num_samples-1 = 1..{self.num_samples - 1}"
            )
        for name in (
            "minibatch_size", "learning_rate", "num_epochs", "freq_info", "freq_save", "val_fre",
            "samples_per_scan", "val_samples_per_scan", "downsample", "max_stride",
            "inference_batch_size", "num_folds", "log_every_steps",
        ):
            value = getattr(self, name)
            # `not value > 0` also rejects nan.
            if not value > 0 or (isinstance(value, float) and not value < float("inf")):
                problems.append(f"{name}={value}: must be positive")
        non_negative = ("num_workers", "weight_decay", "warmup_steps", "grad_clip", "save_every_steps", "val_scan_every")
        for name in non_negative:
            value = getattr(self, name)
            if not value >= 0:
                problems.append(f"{name}={value}: must be >= 0")
        for name in ("reverse_prob", "flip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)}: must be in [0, 1]")
        if not 0.0 <= self.gain_jitter < 1.0:
            problems.append(f"gain_jitter={self.gain_jitter}: must be in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps={self.max_steps}: must be >= 1 or none")
        if not _DEVICE.fullmatch(self.device):
            problems.append(f"device={self.device!r}: expected auto, cpu, cuda or cuda:N")
        problems += self._fold_problems()
        if problems:
            raise InputError("invalid training options:\n  - " + "\n  - ".join(problems))

    def _patch_flow_problems(self) -> list[str]:
        problems = []
        if self.patch_size < 16 or self.patch_size % 8:
            problems.append(f"patch_size={self.patch_size}: expected a multiple of 8, at least 16")
        if not 1 <= self.search_radius < self.patch_size // 4:
            problems.append(f"search_radius={self.search_radius}: expected 1..{self.patch_size // 4 - 1} "
                            f"(less than a quarter of patch_size={self.patch_size})")
        if self.num_patches < 1:
            problems.append(f"num_patches={self.num_patches}: must be positive")
        if self.robust_iterations < 0:
            problems.append(f"robust_iterations={self.robust_iterations}: must be >= 0 (0 = no re-weighting)")
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        changed = [name for name in ("patch_size", "num_patches", "search_radius", "patch_selection", "robust_iterations")
                   if getattr(self, name) != defaults[name]]
        if changed and self.model_name not in ("patch_flow", "seq_flow"):
            problems.append(f"{', '.join(changed)}: options of model_name='patch_flow' or 'seq_flow' (its "
                            f"encoder) only (got model_name={self.model_name!r})")
        return problems

    def _sequence_problems(self) -> list[str]:
        problems = []
        consecutive = self.window_pairs == "consecutive"
        if consecutive and self.num_pred != self.num_samples - 1:
            problems.append(f"window_pairs='consecutive' predicts every frame after the first: num_pred must be "
                            f"num_samples-1 = {self.num_samples - 1} (got {self.num_pred})")
        if self.model_name == "seq_flow" and (not consecutive or (self.pred_type, self.label_type) !=
                                              ("parameter", "parameter")):
            problems.append(f"model_name='seq_flow' predicts the parameters of every consecutive pair: it needs "
                            f"window_pairs='consecutive', pred_type='parameter', label_type='parameter' (got "
                            f"{self.window_pairs!r}, {self.pred_type!r}, {self.label_type!r})")
        if not self.accumulated_loss_weight >= 0 or self.accumulated_loss_weight == float("inf"):
            problems.append(f"accumulated_loss_weight={self.accumulated_loss_weight}: must be a finite number >= 0")
        elif self.accumulated_loss_weight > 0 and not consecutive:
            problems.append(f"accumulated_loss_weight={self.accumulated_loss_weight}: accumulating needs "
                            f"window_pairs='consecutive' (got {self.window_pairs!r})")
        offsets = list(self.seq_offsets)
        bad_offsets = 1 not in offsets or len(set(offsets)) != len(offsets) or \
            any(not 1 <= k < self.num_samples for k in offsets)
        if self.model_name == "seq_flow" and bad_offsets:
            problems.append(f"seq_offsets={offsets}: expected distinct frame distances in 1..num_samples-1 = "
                            f"1..{self.num_samples - 1}, 1 among them")
        if self.feature_cache:
            if self.model_name != "seq_flow" or not self.freeze_encoder:
                problems.append(f"feature_cache=True caches what a fixed encoder measures: it needs model_name='seq_flow' "
                                f"and freeze_encoder=True (got {self.model_name!r}, {self.freeze_encoder})")
            augmented = {name: getattr(self, name) for name, off in (("reverse_prob", 0.0), ("max_stride", 1),
                                                                      ("flip_prob", 0.0), ("gain_jitter", 0.0))
                         if getattr(self, name) != off}
            if augmented or self.sample_range != self.num_samples:
                problems.append(f"feature_cache=True measures each scan once, as it is: no frame augmentation "
                                f"(got {augmented}) and contiguous windows (sample_range={self.sample_range} must "
                                f"equal num_samples={self.num_samples})")
        if self.seq_hidden < 1:
            problems.append(f"seq_hidden={self.seq_hidden}: must be positive")
        if self.seq_appearance_dim < 0:
            problems.append(f"seq_appearance_dim={self.seq_appearance_dim}: must be >= 0 (0 = moments only)")
        defaults = {field.name: field.default_factory() if field.default is dataclasses.MISSING else field.default
                    for field in dataclasses.fields(self)}
        changed = [name for name in ("seq_offsets", "seq_hidden", "seq_appearance_dim", "freeze_encoder", "feature_cache")
                   if getattr(self, name) != defaults[name]]
        if changed and self.model_name != "seq_flow":
            problems.append(f"{', '.join(changed)}: options of model_name='seq_flow' only "
                            f"(got model_name={self.model_name!r})")
        return problems

    def _fold_problems(self) -> list[str]:
        problems = []
        folds = {"train_folds": self.train_folds, "val_folds": self.val_folds, "test_folds": self.test_folds}
        allowed = f"0..{self.num_folds - 1}"
        for name, ids in folds.items():
            bad = [i for i in ids if not 0 <= i < self.num_folds]
            if bad:
                problems.append(f"{name}={ids}: fold ids {bad} are outside {allowed} (num_folds={self.num_folds})")
            if len(set(ids)) != len(ids):
                problems.append(f"{name}={ids}: a fold is listed twice")
        if not self.train_folds:
            problems.append("train_folds is empty: at least one fold must be used for training")
        names = list(folds)
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                shared = sorted(set(folds[names[a]]) & set(folds[names[b]]))
                if shared:
                    problems.append(f"{names[a]} and {names[b]} share folds {shared}: they must be disjoint")
        return problems
