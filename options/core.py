"""Typed options: a dataclass per script, YAML presets, and command-line flags generated from it.

An options class is a ``@dataclass`` whose fields carry ``metadata`` (write them with
:func:`option`): ``help`` (str), optional ``choices`` (tuple) and ``aliases`` (extra flag names such
as ``"NUM_SAMPLES"``, the TUS-REC baseline's spellings, so commands from the challenge README still
run). Supported field types: ``int``, ``float``, ``str``, ``bool``, ``X | None`` of those,
``list[int]`` and ``list[str]``.

Values are resolved in three layers, later ones winning::

    dataclass defaults  <  preset YAML (--preset NAME or --preset path.yaml)  <  command line

Every value is converted to its field's type wherever it comes from (YAML 1.1 reads ``1e-4`` as a
string, not a float), unknown keys are errors with a close match, and the class's ``validate()``
checks combinations. The resolved options are written back with :func:`write_options` as a valid
preset, and stored in checkpoints as the plain dict of :func:`options_to_dict`.

Conversion rules, the same for YAML and the command line:

- ``bool``: true/false, yes/no, on/off, 1/0 (any case). On the command line a value is required
  (``--amp false``), so a flag never flips a default silently.
- ``X | None``: YAML ``null``/``~``; the strings ``none``/``null`` (any case) on the command line, and
  in YAML too unless X is ``str`` (there ``name: none`` stays the string ``"none"``).
- lists: ``0,1,2``, ``[0,1,2]`` or several values (``--train_folds 0 1 2``); ``''`` or ``[]`` is the
  empty list. YAML lists as usual.
- ``int`` also accepts integral numbers written as floats (``1e8``); ``str`` fields reject YAML values
  that are not strings (``name: 2024`` reads as an int and ``name: 0123`` as the octal 83), asking
  for quotes instead of guessing.

Nothing happens at import: no parsing, no folders, no file access.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import sys
import types
import typing
from pathlib import Path

import yaml

from utils.atomic import atomic_path
from utils.errors import InputError

__all__ = [
    "PRESETS_DIR",
    "option",
    "build_parser",
    "parse_options",
    "load_preset",
    "options_from_dict",
    "options_to_dict",
    "write_options",
    "list_presets",
    "resolve_preset_path",
]

PRESETS_DIR = Path(__file__).resolve().parent / "presets"

_BASE_TYPES = (int, float, str, bool)
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_NONE = frozenset({"none", "null"})
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "a boolean (true/false/yes/no/1/0)"}
_METAVARS = {int: "INT", float: "FLOAT", str: "STR", bool: "{true,false}"}


def option(default, help: str, *, choices: tuple = (), aliases: tuple = ()):  # noqa: A002 (argparse's word)
    """A dataclass field with the metadata this module reads; list defaults are copied per instance."""
    metadata = {"help": help, "choices": tuple(choices), "aliases": tuple(aliases)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=functools.partial(list, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------
# Field specifications
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What this module needs to know about one field."""

    name: str
    base: type  # int, float, str or bool; the element type of a list
    optional: bool
    is_list: bool
    default: object
    help: str
    choices: tuple
    aliases: tuple

    def expected(self) -> str:
        """The accepted values in words, for error messages."""
        if self.choices:
            words = f"one of {list(self.choices)}"
        else:
            words = _TYPE_WORDS[self.base]
        if self.is_list:
            words = f"a comma-separated list (e.g. 0,1,2) whose items are each {words}"
        return words + (" or none" if self.optional else "")


def _split_type(name: str, hint) -> tuple[type, bool, bool]:
    """``(base, optional, is_list)`` of a field's resolved type hint."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"option {name!r}: unsupported type {hint!r} (only X | None unions)")
        optional, hint, origin = True, args[0], typing.get_origin(args[0])
    is_list = origin is list
    if is_list:
        (hint,) = typing.get_args(hint) or (None,)
        if hint not in (int, str):
            raise TypeError(f"option {name!r}: unsupported list element type {hint!r} (int or str)")
    if hint not in _BASE_TYPES:
        raise TypeError(f"option {name!r}: unsupported type {hint!r} (int, float, str, bool, X | None, list)")
    return hint, optional, is_list


@functools.cache
def _specs(cls) -> dict[str, _Spec]:
    """Field name -> spec, in field order; checks that no flag name is used twice."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    hints = typing.get_type_hints(cls)
    specs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        base, optional, is_list = _split_type(f.name, hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"option {f.name!r} of {cls.__name__} has no default")
        specs[f.name] = _Spec(
            name=f.name,
            base=base,
            optional=optional,
            is_list=is_list,
            default=default,
            help=f.metadata.get("help", ""),
            choices=tuple(f.metadata.get("choices", ())),
            aliases=tuple(a for a in f.metadata.get("aliases", ()) if a != f.name),
        )
    owner: dict[str, str] = {}
    for spec in specs.values():
        for flag in (spec.name, *spec.aliases):
            if flag == "preset" or owner.setdefault(flag, spec.name) != spec.name:
                raise TypeError(f"{cls.__name__}: flag name {flag!r} of {spec.name!r} is already taken")
    return specs


def _key_map(cls) -> dict[str, str]:
    """Every accepted key (field names and aliases) -> field name."""
    return {key: spec.name for spec in _specs(cls).values() for key in (spec.name, *spec.aliases)}


# --------------------------------------------------------------------------------------------
# Value conversion
# --------------------------------------------------------------------------------------------


class _BadValue(ValueError):
    """A value that does not fit its field; the message says what was expected."""


def _convert_scalar(spec: _Spec, value):
    base = spec.base
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _BadValue
    if isinstance(value, bool):  # bool is an int subclass: `num_samples: yes` must not become 1
        raise _BadValue
    if base is str:
        if isinstance(value, str):
            return value
        # YAML typed it (name: 2024, name: 0123 == 83); quoting says what was meant.
        raise _BadValue("YAML read it as a " + type(value).__name__ + "; put the value in quotes")
    if base is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
            try:
                value = float(value)
            except ValueError:
                raise _BadValue from None
        # 1e8 or 1.0e8: an integral float is an int written the scientific way.
        if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
            return int(value)
        raise _BadValue
    # float
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _BadValue from None
    raise _BadValue


def _convert(spec: _Spec, value, from_cli: bool = False):
    """``value`` (a YAML value or one command-line string) converted to the field's type.

    Raises _BadValue (a ValueError) whose message, if any, adds a hint to "expected ...".
    """
    if value is None:
        if spec.optional:
            return None
        raise _BadValue
    if (
        spec.optional
        and isinstance(value, str)
        and value.strip().lower() in _NONE
        and (from_cli or spec.base is not str or spec.is_list)
    ):
        return None
    if spec.is_list:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            items = [part.strip() for part in text.split(",") if part.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        converted = [_convert_scalar(spec, item) for item in items]
    else:
        if isinstance(value, (list, tuple, dict)):
            raise _BadValue
        converted = _convert_scalar(spec, value)
    if spec.choices:
        for item in converted if spec.is_list else [converted]:
            if item not in spec.choices:
                raise _BadValue
    return converted


def _value_error(source: str, key: str, value, spec: _Spec, hint: str = "") -> ValueError:
    hint = f" ({hint})" if hint else ""
    return ValueError(f"{source}: {key}: {value!r} is not valid for {spec.name}; expected {spec.expected()}{hint}")


def _normalise(cls, mapping, source: str) -> dict:
    """Keys (field names or aliases) -> field names, values converted; errors name ``source``."""
    if not isinstance(mapping, dict):
        raise InputError(f"{source}: expected a mapping of option names to values, got {type(mapping).__name__}")
    keys = _key_map(cls)
    specs = _specs(cls)
    values: dict = {}
    given_as: dict[str, str] = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or key not in keys:
            raise InputError(_unknown_key_message(cls, key, source))
        name = keys[key]
        if name in values:
            raise InputError(f"{source}: {name} is given twice (as {given_as[name]!r} and as {key!r})")
        try:
            values[name] = _convert(specs[name], value)
        except _BadValue as exc:
            raise _value_error(source, key, value, specs[name], str(exc)) from None
        given_as[name] = key
    return values


def _unknown_key_message(cls, key, source: str) -> str:
    names = list(_specs(cls))
    close = difflib.get_close_matches(str(key), list(_key_map(cls)), n=1, cutoff=0.6)
    if close:
        target = _key_map(cls)[close[0]]
        hint = f"; did you mean {close[0]!r}" + (f" (= {target})" if target != close[0] else "") + "?"
    else:
        hint = ""
    return f"{source}: unknown option {key!r}{hint} Allowed: {', '.join(names)} (or their aliases)"


# --------------------------------------------------------------------------------------------
# Presets (YAML)
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML loader that rejects a key given twice (PyYAML would silently keep the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def list_presets() -> list[str]:
    """Names of the shipped presets (``options/presets/*.yaml`` without the suffix), sorted."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_preset_path(name_or_path) -> Path:
    """The file of a preset given by name (``fast_cpu``) or path (``my.yaml``, ``runs/x/options.yaml``).

    A value that names an existing file, or that contains a path separator or ends in
    ``.yaml``/``.yml``, is a path; anything else is looked up in ``PRESETS_DIR``.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    is_path = path.is_file() or path.suffix in (".yaml", ".yml") or "/" in text or "\\" in text
    if not is_path:
        path = PRESETS_DIR / f"{text}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"preset {text!r} not found (looked for {path}); "
            f"available presets in {PRESETS_DIR}: {', '.join(list_presets()) or 'none'}, or a path to a .yaml file"
        )
    return path


def load_preset(cls, name_or_path) -> dict:
    """The options a preset sets, as ``{field name: value of the field's type}`` in file order.

    Keys may be field names or aliases. Raises FileNotFoundError for a missing preset (listing the
    available ones) and ValueError naming the file for malformed YAML, an unknown key (with a close
    match and the allowed keys) or a value of the wrong type (with the expected type).
    """
    path = resolve_preset_path(name_or_path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (safe subclass)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from None
    return _normalise(cls, {} if data is None else data, str(path))


# --------------------------------------------------------------------------------------------
# Dicts (checkpoints) and files (run folders)
# --------------------------------------------------------------------------------------------


def _validate(options) -> None:
    validate = getattr(options, "validate", None)
    if callable(validate):
        validate()


def options_from_dict(cls, mapping, source: str = "options"):
    """An options object from a dict (e.g. a checkpoint's ``options``), converted and validated.

    Missing keys take the defaults; unknown keys and wrong types raise ValueError naming ``source``.
    """
    options = cls(**_normalise(cls, mapping, source))
    _validate(options)
    return options


def options_to_dict(options) -> dict:
    """``{field name: value}`` in field order, of plain types only (str, int, float, bool, None, list).

    Safe to store in a checkpoint read with ``torch.load(weights_only=True)``.
    """
    specs = _specs(type(options))
    return {name: _plain(getattr(options, name)) for name in specs}


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None:
        return None
    # Cast subclasses (an IntEnum, a str subclass) to the builtin: weights_only loading refuses them.
    for plain in (bool, int, float, str):  # bool first: it is an int subclass
        if isinstance(value, plain):
            return plain(value)
    raise TypeError(f"option value {value!r} of type {type(value).__name__} is not a plain type")


def _yaml_line(key: str, value) -> str:
    # Flow style for lists only ([0, 1, 2] on one line); a flow mapping would not be a preset.
    flow = None if isinstance(value, list) else False
    line = yaml.safe_dump({key: value}, default_flow_style=flow, sort_keys=False, width=math.inf).rstrip("\n")
    if "\n" in line:
        # A string with line breaks: YAML would fold it over lines; a JSON string is valid YAML.
        line = f"{key}: {json.dumps(value)}"
    return line


def write_options(options, path, header: str = "") -> Path:
    """Write every resolved option to ``path`` as YAML that is a valid preset; returns ``path``.

    Keys in field order, each with its help as a comment and the default where it differs, so the
    file both documents a run and reproduces it with ``--preset path``. Floats are written with
    ``repr`` (shortest exact round trip). The file appears atomically (temporary name, rename).
    """
    specs = _specs(type(options))
    values = options_to_dict(options)
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    for name, value in values.items():
        spec = specs[name]
        comment = " ".join(spec.help.split())
        if value != spec.default:
            comment += f" [default: {_show(spec.default)}]"
        lines.append(_yaml_line(name, value) + (f"  # {comment}" if comment else ""))
    text = "\n".join(lines) + "\n"
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "[]"
    return str(value)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _ListAction(argparse.Action):
    """Flatten several values, each possibly comma-separated: ``0,1 2`` -> ``[0, 1, 2]``."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [item for part in values for item in (part if part is not None else [])])


def _cli_converter(spec: _Spec):
    def convert(text: str):
        try:
            return _convert(spec, text, from_cli=True)
        except _BadValue as exc:
            hint = f" ({exc})" if str(exc) else ""
            raise argparse.ArgumentTypeError(f"{text!r} is not valid; expected {spec.expected()}{hint}") from None

    convert.__name__ = spec.name
    return convert


def build_parser(cls, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add ``--preset`` and one flag per field of ``cls`` (plus its aliases) to ``parser``.

    Flags default to ``argparse.SUPPRESS``, so the parsed namespace holds only what was given and
    the dataclass defaults and the preset stay the lower layers. Abbreviated flags are turned off on
    ``parser`` (a typo must not match a flag by its prefix). Returns the parser (a new one if none was
    given).
    """
    specs = _specs(cls)
    if parser is None:
        doc = (cls.__doc__ or "").strip()
        # dataclass() writes a signature as the docstring of a class that has none: not a description.
        parser = argparse.ArgumentParser(description=None if doc.startswith(f"{cls.__name__}(") else doc)
    # Prefix matching would take a typo (--NUM_EPOCH) for a flag; flags are exact, like preset keys.
    parser.allow_abbrev = False
    group = parser.add_argument_group(
        f"options ({cls.__name__}; precedence: defaults < --preset < flags)"
    )
    group.add_argument(
        "--preset",
        default=None,
        metavar="NAME_OR_PATH",
        help=f"a preset in {PRESETS_DIR.name}/ by name (without .yaml), or a path to a .yaml file, e.g. a "
        "run folder's options.yaml",
    )
    for spec in specs.values():
        flags = [f"--{spec.name}"] + [f"--{alias}" for alias in spec.aliases]
        text = spec.help
        if spec.choices:
            text += f"; one of {', '.join(str(c) for c in spec.choices)}"
        text += f" [default: {_show(spec.default)}"
        if spec.aliases:
            text += "; alias " + ", ".join(f"--{a}" for a in spec.aliases)
        text += "]"
        metavar = spec.name.upper() if spec.choices else _METAVARS[spec.base]
        kwargs = dict(dest=spec.name, default=argparse.SUPPRESS, type=_cli_converter(spec), metavar=metavar)
        if spec.is_list:
            kwargs.update(nargs="+", action=_ListAction, metavar=metavar + "[,...]")
        group.add_argument(*flags, help=text.replace("%", "%%"), **kwargs)
    return parser


def parse_options(cls, argv=None, extra: argparse.ArgumentParser | None = None):
    """Resolve ``cls`` from defaults < ``--preset`` < flags; returns ``(options, namespace)``.

    ``extra`` is the script's own parser (with its description and its CLI-only flags such as
    ``--resume``); the option flags are added to it. ``namespace`` holds everything that is not an
    option: ``preset`` (None when not given) and the flags of ``extra``. A field called ``name``
    left at None takes the preset's file name (without .yaml), so a run names itself after its
    preset. Mistakes (unknown flag, bad value, unknown preset key, failed ``validate()``) exit
    through ``parser.error`` with the message, as argparse does for its own errors.
    """
    parser = build_parser(cls, extra)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    specs = _specs(cls)
    given = {name: getattr(args, name) for name in specs if hasattr(args, name)}
    for name in given:
        delattr(args, name)
    try:
        values = load_preset(cls, args.preset) if args.preset is not None else {}
        values.update(given)
        if args.preset is not None and "name" in specs and values.get("name") is None:
            values["name"] = resolve_preset_path(args.preset).stem
        options = cls(**values)
        _validate(options)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    return options, args
