"""The one way networks are built: a name -> builder registry, and the constructor arguments a checkpoint stores.

A builder is a function ``builder(in_frames: int, pred_dim: int, **kwargs) -> torch.nn.Module``
decorated with ``@register_model("name")``. Builders take explicit arguments, never an options
object, so a network can be rebuilt from a checkpoint's ``model_args`` alone (``build_from_args``).
Keyword arguments beyond the two every builder takes (e.g. the pixel size a patch network measures
motion in) travel in ``model_args["kwargs"]``, plain JSON-able values.

Importing this module is cheap: the built-in builder modules import torchvision inside the builder
functions, so ``import models`` (e.g. to list ``MODEL_NAMES`` for argparse ``choices=``) loads no
torchvision. To add a network, write a decorated builder in a module under ``models/`` and add that
module to ``_BUILTIN_MODULES`` below.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch

from utils.errors import InputError

_REGISTRY: dict[str, Callable[..., torch.nn.Module]] = {}

# Modules whose builders register themselves when imported (at the end of this module).
_BUILTIN_MODULES = ("models.efficientnet", "models.resnet", "models.patch_flow", "models.seq_flow")

_ARG_KEYS = ("name", "in_frames", "pred_dim")
_OPTIONAL_ARG_KEYS = ("kwargs",)


def register_model(name: str):
    """Decorator: register ``builder(in_frames, pred_dim, **kwargs) -> nn.Module`` under ``name``."""

    def decorator(builder):
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise InputError(f"a model named {name!r} is already registered ({_REGISTRY[name].__module__})")
        _REGISTRY[name] = builder
        return builder

    return decorator


def available_models() -> tuple[str, ...]:
    """Names of every registered model, sorted (includes models registered after import)."""
    return tuple(sorted(_REGISTRY))


def _check_name(name) -> None:
    if name not in _REGISTRY:
        raise InputError(f"unknown model {name!r}; available models: {', '.join(available_models())}")


def _check_positive_int(what: str, value) -> int:
    # bool is an int subclass; True as a channel count is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what}={value!r} must be a positive integer")
    return value


def model_args(name: str, in_frames: int, pred_dim: int, **kwargs) -> dict:
    """The constructor arguments a checkpoint stores: ``{"name", "in_frames", "pred_dim"}`` (plain
    types), plus ``"kwargs"`` when the builder takes more (omitted when there are none, so the
    baseline's networks store exactly what they always did)."""
    _check_name(name)
    args = {
        "name": str(name),
        "in_frames": _check_positive_int("in_frames", in_frames),
        "pred_dim": _check_positive_int("pred_dim", pred_dim),
    }
    if kwargs:
        args["kwargs"] = dict(kwargs)
    return args


def build_model(name: str, in_frames: int, pred_dim: int, **kwargs) -> torch.nn.Module:
    """Build the network ``name`` taking ``in_frames`` frames as channels and giving ``pred_dim`` outputs.

    Input [B, in_frames, H, W] float (frames / 255), output [B, pred_dim]. Weights are randomly
    initialised (never downloaded); load trained ones with ``utils.checkpoint``. ``kwargs`` go to the
    builder; one it does not take is refused with the ones it does.
    """
    args = model_args(name, in_frames, pred_dim, **kwargs)
    builder = _REGISTRY[args["name"]]
    accepted = [key for key in inspect.signature(builder).parameters if key not in ("in_frames", "pred_dim")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise InputError(f"model {name!r} takes no argument(s) {unknown}; it takes {accepted or 'none'}")
    return builder(in_frames=args["in_frames"], pred_dim=args["pred_dim"], **kwargs)


def build_from_args(args: dict) -> torch.nn.Module:
    """Rebuild a network from the ``model_args`` dict stored in a checkpoint."""
    if not isinstance(args, dict):
        raise InputError(f"model_args must be a dict with keys {list(_ARG_KEYS)}, got {type(args).__name__}")
    missing = [key for key in _ARG_KEYS if key not in args]
    unknown = sorted(str(key) for key in args if key not in _ARG_KEYS + _OPTIONAL_ARG_KEYS)
    if missing or unknown:
        raise InputError(
            f"model_args {args!r}: missing keys {missing}, unknown keys {unknown}; expected {list(_ARG_KEYS)} "
            f"and optionally {list(_OPTIONAL_ARG_KEYS)}"
        )
    kwargs = args.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise InputError(f"model_args['kwargs'] must be a dict, got {type(kwargs).__name__}")
    return build_model(args["name"], args["in_frames"], args["pred_dim"], **kwargs)


for _module in _BUILTIN_MODULES:
    importlib.import_module(_module)

# Snapshot of the built-in names for argparse choices; available_models() also sees later registrations.
MODEL_NAMES: tuple[str, ...] = available_models()


def output_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """The layer that produces the prediction: by the registry's contract, the model's last ``nn.Linear``."""
    layers = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    if not layers:
        raise InputError(f"{type(model).__name__} has no nn.Linear output layer")
    return layers[-1]
