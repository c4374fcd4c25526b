"""Typed options of the scripts, their YAML presets (``options/presets/``) and generated flags."""

from options.core import (
    PRESETS_DIR,
    build_parser,
    list_presets,
    load_preset,
    option,
    options_from_dict,
    options_to_dict,
    parse_options,
    resolve_preset_path,
    write_options,
)
from options.train_options import TrainOptions

__all__ = [
    "PRESETS_DIR",
    "TrainOptions",
    "build_parser",
    "list_presets",
    "load_preset",
    "option",
    "options_from_dict",
    "options_to_dict",
    "parse_options",
    "resolve_preset_path",
    "write_options",
]
