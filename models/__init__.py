"""Pose networks, built only through the registry (``build_model``; ``build_from_args`` for checkpoints)."""

from models.registry import (
    MODEL_NAMES,
    available_models,
    build_from_args,
    build_model,
    model_args,
    output_layer,
    register_model,
)

__all__ = ["MODEL_NAMES", "available_models", "build_from_args", "build_model", "model_args", "output_layer",
           "register_model"]
