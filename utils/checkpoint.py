"""The checkpoint format: one plain dict, written atomically, read back with ``weights_only=True``.

A checkpoint holds everything ``--resume`` needs and everything needed to rebuild the network from
the file alone (``model_args``, see ``models.registry``)::

    {
        "format_version": 1,
        "model": state_dict,               # of the unwrapped model: no "module." prefix
        "optimizer": state_dict | None,
        "scheduler": state_dict | None,
        "scaler": state_dict | None,       # torch.amp.GradScaler
        "epoch": int,                      # the epoch this checkpoint was written in (resume at epoch + 1,
        "batch_in_epoch": int,             #   or inside it when batch_in_epoch > 0)
        "step": int,                       # optimiser steps so far
        "best": dict,                      # e.g. {"epoch": 3, "val_loss": 0.12}, plain types
        "options": dict,                   # the resolved options, plain types (options.core.options_to_dict)
        "model_args": dict,                # {"name", "in_frames", "pred_dim"}
        "rng": {"torch": ByteTensor, "cuda": list[ByteTensor] | None},
    }

``train.py`` adds ``folds`` (subject ids per fold), ``label_stats`` and ``frame_size`` ([H, W] of
the training scans, before down-sampling: prediction warns on frames of another size); readers
treat them as optional, so older checkpoints still load.

Only tensors, containers and plain Python values go in, so ``torch.load(..., weights_only=True)``
reads it without running pickled code. ``load_model_weights`` also reads the bare state dicts the
TUS-REC baseline releases (``--init_weights``).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from utils.atomic import atomic_path
from utils.errors import InputError

FORMAT_VERSION = 1

REQUIRED_KEYS = (
    "format_version",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "batch_in_epoch",
    "step",
    "best",
    "options",
    "model_args",
    "rng",
)

# Prefixes that wrappers add to parameter names: DataParallel/DistributedDataParallel ("module.")
# and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# How many names of each kind a mismatch message lists.
_SHOW = 5


# --------------------------------------------------------------------------------------------
# Models and random state
# --------------------------------------------------------------------------------------------


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def strip_wrapper_prefix(state_dict: Mapping) -> dict:
    """``state_dict`` with a ``module.`` / ``_orig_mod.`` prefix shared by every key removed (repeatedly)."""
    state = dict(state_dict)
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(isinstance(key, str) and key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return state


def rng_state() -> dict:
    """The torch (CPU) and CUDA generator states, in the checkpoint's ``rng`` layout."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(rng: dict) -> None:
    """Restore the generators saved by ``rng_state`` (CUDA only where saved and available)."""
    # Generator states must be CPU ByteTensors even when the checkpoint was loaded onto a GPU.
    torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") is not None and torch.cuda.is_available():
        states = [state.cpu() for state in rng["cuda"]]
        # A run resumed on fewer GPUs restores the devices it has.
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def _plain(value, where: str):
    """``value`` with numpy scalars and paths turned into builtins; ValueError for anything else."""
    if value is None:
        return value
    if isinstance(value, np.generic):  # before the builtins: np.float64 subclasses float
        return value.item()
    # Cast subclasses (np.float64, an IntEnum) to the builtin: weights_only loading refuses them.
    for plain in (bool, int, float, str):  # bool first: it is an int subclass
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        out = {}
        for key, v in value.items():
            if not isinstance(key, (str, int)):
                raise InputError(f"checkpoint {where} has a key {key!r} of type {type(key).__name__}; use str or int")
            out[key] = _plain(v, f"{where}[{key!r}]")
        return out
    raise InputError(
        f"checkpoint {where} = {value!r} is a {type(value).__name__}; only str, int, float, bool, None, "
        "list, tuple and dict can be read back with weights_only=True"
    )


def save_checkpoint(path, checkpoint: dict) -> Path:
    """Write ``checkpoint`` (the dict described in the module docstring) to ``path`` atomically.

    The file is written under a temporary name beside ``path`` and renamed onto it, so an
    interrupted save never leaves a truncated checkpoint and never destroys the previous one.
    Raises ValueError naming missing keys, a wrong ``format_version`` or a non-plain value in
    ``best``/``options``/``model_args``. Returns ``path``.
    """
    path = Path(path)
    if not isinstance(checkpoint, Mapping):
        raise InputError(f"checkpoint for {path} must be a dict, got {type(checkpoint).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise InputError(f"checkpoint for {path} misses keys {missing}; required: {list(REQUIRED_KEYS)}")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise InputError(f"checkpoint for {path} has format_version={checkpoint['format_version']!r}; "
                         f"expected {FORMAT_VERSION}")
    if not isinstance(checkpoint["model"], Mapping):
        kind = type(checkpoint["model"]).__name__
        raise InputError(f"checkpoint for {path}: 'model' must be a state dict, got {kind}")
    out = dict(checkpoint)
    # A state dict taken from a DDP/compiled model without unwrap_model: store the bare names.
    out["model"] = strip_wrapper_prefix(checkpoint["model"])
    for key in ("best", "options", "model_args"):
        out[key] = _plain(checkpoint[key], key)
    # Serialised in memory first: torch.save writing to a full disk fails inside its zip writer with
    # "enforce fail ... unexpected pos", never naming the disk; a plain write raises ENOSPC.
    buffer = io.BytesIO()
    torch.save(out, buffer)
    with atomic_path(path) as tmp_path:
        try:
            with open(tmp_path, "wb") as handle:
                handle.write(buffer.getbuffer())
        except OSError as error:
            raise OSError(error.errno, f"{error.strerror} while saving a checkpoint of "
                          f"{buffer.getbuffer().nbytes / 1e6:.1f} MB (the previous one is intact)", str(path)) from None
    return path


def _torch_load(path: Path, map_location):
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError) as error:
        raise InputError(f"{path} is not a readable PyTorch checkpoint (torch.load with weights_only=True "
                         f"failed: {error})") from error


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (``weights_only=True``: no code is unpickled).

    Raises FileNotFoundError naming a missing path, and ValueError naming the file when it is not a
    torch file, not a dict, misses required keys, or has another ``format_version``.
    """
    path = Path(path)
    checkpoint = _torch_load(path, map_location)
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict "
                         f"(for bare weights use load_model_weights / --init_weights)")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        hint = " (it looks like a bare state dict: use --init_weights)" if _looks_like_state_dict(checkpoint) else ""
        raise InputError(f"{path} misses checkpoint keys {missing}{hint}; required: {list(REQUIRED_KEYS)}")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise InputError(f"{path} has checkpoint format_version={checkpoint['format_version']!r}; "
                         f"this code reads format_version={FORMAT_VERSION}")
    return _with_settings_of_its_time(checkpoint)


def _with_settings_of_its_time(checkpoint: dict) -> dict:
    """Spell out the settings an older checkpoint was trained with where their defaults changed since.

    ``patch_flow`` checkpoints written before ``patch_selection`` existed picked their patches by
    texture; the default is now ``"speckle"``, so without this they would predict (and resume
    training) with patches they never saw.
    """
    args = checkpoint.get("model_args")
    if isinstance(args, dict) and args.get("name") == "patch_flow":
        kwargs = args.get("kwargs")
        if isinstance(kwargs, dict) and "patch_selection" not in kwargs:
            kwargs["patch_selection"] = "texture"
            options = checkpoint.get("options")
            if isinstance(options, dict):
                options.setdefault("patch_selection", "texture")
    return checkpoint


def _looks_like_state_dict(obj) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _state_dict_of(obj, path: Path) -> dict:
    """The model state dict inside whatever ``--init_weights`` points at."""
    if isinstance(obj, Mapping):
        if "format_version" in obj and isinstance(obj.get("model"), Mapping):
            return dict(obj["model"])
        if _looks_like_state_dict(obj):
            return dict(obj)
        # Other frameworks' conventions for a full training checkpoint.
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping) and _looks_like_state_dict(obj[key]):
                return dict(obj[key])
    keys = f" with keys {list(obj)[:_SHOW]}" if isinstance(obj, Mapping) else ""
    raise InputError(f"{path} holds neither a checkpoint nor a state dict of tensors (got {type(obj).__name__}{keys})")


def _first(names) -> str:
    names = list(names)
    shown = ", ".join(names[:_SHOW])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > _SHOW else shown


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """``load_state_dict(strict=True)`` with a readable InputError naming ``source`` on mismatch."""
    state = strip_wrapper_prefix(state)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and isinstance(state[key], torch.Tensor) and state[key].shape != value.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches (file vs model): {_first(mismatched)}")
        raise InputError(f"weights in {source} do not fit the model ({type(model).__name__}): " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_model_weights(model: torch.nn.Module, path, map_location="cpu") -> torch.nn.Module:
    """Load network weights only (``--init_weights``) from a checkpoint or a bare state dict.

    Accepts our checkpoints (their ``"model"``) and bare state dicts such as the TUS-REC baseline's
    released ``model_weights`` files; the weights of a model's ``encoder`` alone (a ``patch_flow``
    checkpoint for a ``seq_flow``) load into that encoder, the rest keeping its initialisation. A
    ``module.`` (DataParallel/DDP) or ``_orig_mod.`` prefix is stripped, and ``model`` may itself be
    wrapped. Loads with ``strict=True``; on a mismatch raises
    ValueError naming the file and the first missing keys, unexpected keys and shape mismatches.
    Returns ``model``.
    """
    path = Path(path)
    state = _state_dict_of(_torch_load(path, map_location), path)
    target = unwrap_model(model)
    # Staged training: a network built on a 2-frame encoder (seq_flow's ``encoder``, a patch_flow)
    # starts from that encoder's checkpoint; only a file holding exactly the encoder's weights goes there.
    encoder = getattr(target, "encoder", None)
    if isinstance(encoder, torch.nn.Module) and set(strip_wrapper_prefix(state)) == set(encoder.state_dict()):
        target = encoder
    load_model_state(target, state, str(path))
    return model


def model_from_checkpoint(checkpoint: dict, device="cpu") -> torch.nn.Module:
    """The network a checkpoint describes (``model_args``) with its weights, on ``device``, in eval mode."""
    from models import build_from_args  # imported here: utils must not need models at import time

    model = build_from_args(checkpoint["model_args"])
    load_model_state(model, checkpoint["model"], f"checkpoint of model {checkpoint['model_args'].get('name')!r}")
    return model.to(device).eval()
