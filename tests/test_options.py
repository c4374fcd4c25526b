"""Options: defaults < preset < command line, the baseline's flag aliases, conversion and errors.

Expected values come from the specification (the TUS-REC 2025 baseline's settings and the presets'
stated purpose), not from running the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from options import (
    PRESETS_DIR,
    TrainOptions,
    build_parser,
    list_presets,
    load_preset,
    option,
    options_from_dict,
    options_to_dict,
    parse_options,
    write_options,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse(argv, extra=None):
    return parse_options(TrainOptions, argv, extra)


def write_yaml(tmp_path, text, name="preset.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def cli_error(capsys, argv) -> str:
    """Parse ``argv``, expect argparse's exit 2, return what it printed to stderr."""
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Defaults and precedence
# --------------------------------------------------------------------------------------------


def test_defaults_are_the_official_baseline():
    opts = TrainOptions()
    assert (opts.pred_type, opts.label_type) == ("parameter", "point")
    assert (opts.num_samples, opts.sample_range, opts.num_pred) == (2, 2, 1)
    assert (opts.minibatch_size, opts.learning_rate, opts.num_epochs) == (16, 1e-4, 100000000)
    assert (opts.freq_info, opts.freq_save, opts.val_fre) == (10, 100, 1)
    assert opts.model_name == "efficientnet_b1"
    assert (opts.num_folds, opts.split_seed) == (5, 4)
    assert (opts.train_folds, opts.val_folds, opts.test_folds) == ([0, 1, 2], [3], [4])
    assert (opts.num_workers, opts.samples_per_scan, opts.downsample) == (8, 1, 1)
    assert opts.data_path == "data" and opts.calib_file is None and opts.name is None
    opts.validate()
    # List defaults are per instance: mutating one must not change the next.
    opts.train_folds.append(3)
    assert TrainOptions().train_folds == [0, 1, 2]


def test_no_arguments_gives_the_defaults():
    opts, args = parse([])
    assert opts == TrainOptions()
    assert args.preset is None


def test_precedence_defaults_preset_cli(tmp_path):
    preset = write_yaml(tmp_path, "minibatch_size: 8  # x\nnum_workers: 3  # x\n")
    opts, _ = parse(["--preset", str(preset), "--num_workers", "1"])
    assert opts.minibatch_size == 8  # preset over default
    assert opts.num_workers == 1  # command line over preset
    assert opts.learning_rate == 1e-4  # default where neither speaks
    # An alias on the command line also beats the preset's field name.
    opts, _ = parse(["--preset", str(preset), "--MINIBATCH_SIZE", "4"])
    assert opts.minibatch_size == 4


def test_shipped_preset_by_name_and_cli_override():
    opts, args = parse(["--preset", "fast_cpu", "--num_epochs", "2"])
    assert opts.model_name == "patch_flow" and opts.minibatch_size == 32
    assert opts.num_epochs == 2
    assert opts.name == "fast_cpu"  # a run is named after its preset unless --name says otherwise
    assert args.preset == "fast_cpu"
    opts, _ = parse(["--preset", "fast_cpu", "--name", "mine"])
    assert opts.name == "mine"


def test_extra_parser_keeps_script_flags_apart():
    extra = argparse.ArgumentParser(description="train")
    extra.add_argument("--resume", default=None)
    extra.add_argument("--init_weights", default=None)
    opts, args = parse(["--resume", "runs/last.pt", "--NUM_SAMPLES", "3", "--SAMPLE_RANGE", "3"], extra)
    assert args.resume == "runs/last.pt" and args.init_weights is None
    assert opts.num_samples == 3
    assert not hasattr(args, "num_samples")  # options live in the options object only


# --------------------------------------------------------------------------------------------
# Aliases: commands from the challenge README
# --------------------------------------------------------------------------------------------

# (baseline flag, field, a non-default value as typed, the value expected)
ALIASES = [
    ("DATA_PATH", "data_path", "data/frames_transfs", "data/frames_transfs"),
    ("FILENAME_CALIB", "calib_file", "data/calib_matrix.csv", "data/calib_matrix.csv"),
    ("LANDMARK_PATH", "landmark_path", "data/landmarks", "data/landmarks"),
    ("PRED_TYPE", "pred_type", "quaternion", "quaternion"),
    ("LABEL_TYPE", "label_type", "parameter", "parameter"),
    ("NUM_SAMPLES", "num_samples", "4", 4),
    ("SAMPLE_RANGE", "sample_range", "5", 5),
    ("NUM_PRED", "num_pred", "1", 1),
    ("model_name", "model_name", "resnet18", "resnet18"),
    ("MINIBATCH_SIZE", "minibatch_size", "8", 8),
    ("LEARNING_RATE", "learning_rate", "2e-5", 2e-5),
    ("NUM_EPOCHS", "num_epochs", "7", 7),
    ("FREQ_INFO", "freq_info", "3", 3),
    ("FREQ_SAVE", "freq_save", "9", 9),
    ("val_fre", "val_fre", "2", 2),
]


@pytest.mark.parametrize("alias, field, text, expected", ALIASES)
def test_every_alias_maps_to_its_field(alias, field, text, expected):
    # num_samples 4 needs a sample_range that fits it; give both spellings the same context.
    context = ["--sample_range", "6"] if field != "sample_range" else ["--num_samples", "2"]
    by_alias, _ = parse(context + [f"--{alias}", text])
    by_name, _ = parse(context + [f"--{field}", text])
    assert getattr(by_alias, field) == expected
    assert by_alias == by_name


def test_challenge_readme_command_parses():
    argv = (
        "--DATA_PATH data --PRED_TYPE parameter --LABEL_TYPE point --NUM_SAMPLES 2 --SAMPLE_RANGE 2 "
        "--NUM_PRED 1 --MINIBATCH_SIZE 16 --LEARNING_RATE 1e-4 --NUM_EPOCHS 10"
    ).split()
    opts, _ = parse(argv)
    assert opts == dataclasses.replace(TrainOptions(), num_epochs=10)
    assert type(opts.learning_rate) is float


def test_help_shows_defaults_and_aliases():
    text = build_parser(TrainOptions).format_help()
    assert "--NUM_SAMPLES" in text and "--num_samples" in text
    assert "[default: 2; alias --NUM_SAMPLES]" in " ".join(text.split())
    assert "quaternion" in text  # choices are listed


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, field, expected",
    [
        ("learning_rate: 1e-3", "learning_rate", 0.001),  # YAML 1.1 reads this as a string
        ("learning_rate: 1.0e-3", "learning_rate", 0.001),
        ("learning_rate: 1", "learning_rate", 1.0),
        ("num_epochs: 1e3", "num_epochs", 1000),
        ("amp: no", "amp", False),
        ("amp: 'True'", "amp", True),
        ("max_steps: null", "max_steps", None),
        ("max_steps: none", "max_steps", None),
        ("calib_file: ~", "calib_file", None),
        ("train_folds: [0, 1]", "train_folds", [0, 1]),
        ("train_folds: 0,1", "train_folds", [0, 1]),
        ("val_folds: []", "val_folds", []),
        ("test_folds: 2", "test_folds", [2]),
        ("name: none", "name", "none"),  # a str field keeps the word; only YAML null is None
        ("NUM_SAMPLES: 3", "num_samples", 3),
    ],
)
def test_yaml_values_are_converted(tmp_path, line, field, expected):
    values = load_preset(TrainOptions, write_yaml(tmp_path, line + "\n"))
    assert values == {field: expected}
    assert type(values[field]) is type(expected)


@pytest.mark.parametrize(
    "argv, field, expected",
    [
        (["--amp", "false"], "amp", False),
        (["--amp", "FALSE"], "amp", False),
        (["--amp", "0"], "amp", False),
        (["--amp", "no"], "amp", False),
        (["--amp", "Yes"], "amp", True),
        (["--amp", "1"], "amp", True),
        (["--max_steps", "none"], "max_steps", None),
        (["--max_steps", "12"], "max_steps", 12),
        (["--calib_file", "NULL"], "calib_file", None),
        (["--name", "none"], "name", None),
        (["--train_folds", "0,1"], "train_folds", [0, 1]),
        (["--train_folds", "0", "1"], "train_folds", [0, 1]),
        (["--train_folds", "[0,1]"], "train_folds", [0, 1]),
        (["--val_folds", ""], "val_folds", []),
        (["--grad_clip", "1"], "grad_clip", 1.0),
    ],
)
def test_cli_values_are_converted(argv, field, expected):
    opts, _ = parse(argv)
    assert getattr(opts, field) == expected
    assert type(getattr(opts, field)) is type(expected)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--amp"], ["--amp", "expected one argument"]),  # a bool flag needs its value
        (["--amp", "maybe"], ["maybe", "boolean"]),
        (["--num_samples", "abc"], ["abc", "integer"]),
        (["--num_samples", "2.5"], ["2.5", "integer"]),
        (["--learning_rate", "fast"], ["fast", "number"]),
        (["--train_folds", "0,x"], ["0,x", "integer"]),
        (["--model_name", "resnet50"], ["resnet50", "efficientnet_b1", "efficientnet_b0", "resnet18"]),
        (["--PRED_TYPE", "euler"], ["euler", "parameter", "transform", "quaternion", "point"]),
        (["--num_sample", "2"], ["unrecognized arguments"]),
    ],
)
def test_bad_cli_values_name_value_and_expected(capsys, argv, words):
    err = cli_error(capsys, argv)
    for word in words:
        assert word in err


# --------------------------------------------------------------------------------------------
# Preset errors
# --------------------------------------------------------------------------------------------


def test_unknown_key_names_file_key_close_match_and_allowed(tmp_path):
    path = write_yaml(tmp_path, "learnig_rate: 0.1\n")
    with pytest.raises(ValueError) as exc:
        load_preset(TrainOptions, path)
    message = str(exc.value)
    assert str(path) in message
    assert "'learnig_rate'" in message
    assert "did you mean 'learning_rate'" in message
    assert "num_samples" in message and "max_stride" in message  # the allowed keys


def test_unknown_alias_like_key_suggests_the_alias(tmp_path):
    path = write_yaml(tmp_path, "NUM_SAMPLE: 3\n")
    with pytest.raises(ValueError, match="did you mean 'NUM_SAMPLES' \\(= num_samples\\)"):
        load_preset(TrainOptions, path)


def test_unknown_key_through_the_cli_exits_with_the_message(tmp_path, capsys):
    path = write_yaml(tmp_path, "learnig_rate: 0.1\n")
    err = cli_error(capsys, ["--preset", str(path)])
    assert "learnig_rate" in err and "learning_rate" in err and str(path) in err


def test_wrong_type_names_file_key_value_and_type(tmp_path):
    path = write_yaml(tmp_path, "num_samples: abc\n")
    with pytest.raises(ValueError) as exc:
        load_preset(TrainOptions, path)
    message = str(exc.value)
    for word in (str(path), "num_samples", "'abc'", "integer"):
        assert word in message


@pytest.mark.parametrize(
    "text, words",
    [
        ("num_samples: true\n", ["num_samples", "True", "integer"]),  # bool is not an int here
        ("name: 2024\n", ["name", "2024", "quotes"]),  # YAML typed it; we do not guess
        ("pred_type: euler\n", ["euler", "parameter", "quaternion"]),
        ("train_folds: {a: 1}\n", ["train_folds", "list"]),
        ("amp: null\n", ["amp", "boolean"]),
        ("num_samples: 3\nNUM_SAMPLES: 4\n", ["twice", "num_samples", "NUM_SAMPLES"]),
        ("num_samples: 3\nnum_samples: 4\n", ["twice", "num_samples"]),
        ("- num_samples\n", ["mapping"]),
        ("num_samples: [1\n", ["YAML"]),
    ],
)
def test_malformed_presets_are_rejected(tmp_path, text, words):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ValueError) as exc:
        load_preset(TrainOptions, path)
    assert str(path) in str(exc.value)
    for word in words:
        assert word in str(exc.value)


def test_missing_preset_lists_the_available_ones(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        load_preset(TrainOptions, "fast_gpu")
    assert "fast_gpu" in str(exc.value) and "fast_cpu" in str(exc.value) and "baseline" in str(exc.value)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_preset(TrainOptions, tmp_path / "nope.yaml")


def test_empty_preset_sets_nothing(tmp_path):
    assert load_preset(TrainOptions, write_yaml(tmp_path, "# only a comment\n")) == {}


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def test_point_prediction_with_parameter_label_is_rejected_with_the_allowed_combinations(capsys):
    err = cli_error(capsys, ["--PRED_TYPE", "point", "--LABEL_TYPE", "parameter"])
    assert "'point'" in err and "'parameter'" in err
    # A point prediction carries no rigid transform: only a point label is allowed, and the message
    # lists every prediction's allowed labels.
    assert "point -> point" in err
    assert "transform -> point, transform" in err


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"num_samples": 1, "sample_range": 1}, ["num_samples=1", "at least 2"]),
        ({"num_samples": 4, "sample_range": 3, "num_pred": 1}, ["sample_range=3", "num_samples=4"]),
        ({"num_pred": 2}, ["num_pred=2", "1..1"]),
        ({"num_pred": 0}, ["num_pred=0"]),
        ({"minibatch_size": 0}, ["minibatch_size=0", "positive"]),
        ({"learning_rate": -1e-4}, ["learning_rate", "positive"]),
        ({"learning_rate": math.nan}, ["learning_rate", "positive"]),
        ({"downsample": 0}, ["downsample=0"]),
        ({"num_workers": -1}, ["num_workers=-1", ">= 0"]),
        ({"reverse_prob": 1.5}, ["reverse_prob=1.5", "[0, 1]"]),
        ({"max_steps": 0}, ["max_steps=0"]),
        ({"device": "gpu"}, ["'gpu'", "cuda:N"]),
        ({"train_folds": [0, 5]}, ["train_folds", "[5]", "0..4"]),
        ({"train_folds": [0, 3]}, ["train_folds and val_folds", "[3]", "disjoint"]),
        ({"test_folds": [3]}, ["val_folds and test_folds", "[3]"]),
        ({"train_folds": []}, ["train_folds is empty"]),
        ({"train_folds": [0, 0]}, ["listed twice"]),
    ],
)
def test_validate_rejects_with_the_allowed_values(changes, words):
    opts = dataclasses.replace(TrainOptions(), **changes)
    with pytest.raises(ValueError) as exc:
        opts.validate()
    for word in words:
        assert word in str(exc.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"device": "cuda:1"},
        {"device": "cpu"},
        {"num_samples": 4, "sample_range": 10, "num_pred": 3},
        {"pred_type": "quaternion", "label_type": "transform"},
        {"val_folds": [], "test_folds": [], "train_folds": [0, 1, 2, 3, 4]},
        {"max_steps": 1, "reverse_prob": 1.0, "val_scan_every": 0},
    ],
)
def test_validate_accepts_valid_variants(changes):
    dataclasses.replace(TrainOptions(), **changes).validate()


def test_validate_lists_every_problem_at_once():
    opts = dataclasses.replace(TrainOptions(), minibatch_size=0, device="tpu")
    with pytest.raises(ValueError) as exc:
        opts.validate()
    assert "minibatch_size=0" in str(exc.value) and "'tpu'" in str(exc.value)


# --------------------------------------------------------------------------------------------
# Writing and reading back
# --------------------------------------------------------------------------------------------


def test_write_options_round_trip(tmp_path):
    opts = dataclasses.replace(
        TrainOptions(),
        learning_rate=0.1 + 0.2,  # not a short decimal: needs the exact repr
        weight_decay=1e-5,
        name="123",  # a str that looks like an int must come back a str
        calib_file=None,
        amp=False,
        train_folds=[0, 1],
        val_folds=[],
        max_steps=7,
        device="cuda:1",
    )
    path = write_options(opts, tmp_path / "run" / "options.yaml", header="resolved options of run 001")
    assert path == tmp_path / "run" / "options.yaml"
    text = path.read_text()
    assert text.startswith("# resolved options of run 001\n")
    keys = [line.split(":")[0] for line in text.splitlines() if not line.startswith("#")]
    assert keys == [f.name for f in dataclasses.fields(TrainOptions)]  # field order, every field
    assert [p.name for p in path.parent.iterdir()] == ["options.yaml"]  # no temporary file left
    assert TrainOptions(**load_preset(TrainOptions, path)) == opts
    # The file is a valid preset for the command line too.
    again, _ = parse(["--preset", str(path)])
    assert again == opts


_texts = st.text(max_size=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    learning_rate=st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False),
    grad_clip=st.floats(allow_nan=False),
    seed=st.integers(min_value=-(2**70), max_value=2**70),
    name=st.none() | _texts,
    data_path=_texts,
    amp=st.booleans(),
    train_folds=st.lists(st.integers(min_value=-3, max_value=300), max_size=5),
    max_steps=st.none() | st.integers(min_value=0),
)
def test_write_options_round_trips_any_values(tmp_path, **fields):
    opts = dataclasses.replace(TrainOptions(), **fields)
    path = write_options(opts, tmp_path / "options.yaml")
    back = TrainOptions(**load_preset(TrainOptions, path))
    assert back == opts
    for name in ("learning_rate", "grad_clip"):
        assert type(getattr(back, name)) is float


def test_options_dict_is_plain_and_survives_weights_only_checkpoints(tmp_path):
    opts, _ = parse(["--preset", "more_frames", "--max_steps", "5", "--val_folds", ""])
    plain = options_to_dict(opts)
    assert list(plain) == [f.name for f in dataclasses.fields(TrainOptions)]

    def check(value):
        if isinstance(value, list):
            for item in value:
                check(item)
        else:
            assert type(value) in (str, int, float, bool, type(None)), value

    check(list(plain.values()))
    assert plain["train_folds"] is not opts.train_folds  # a copy: the checkpoint cannot alias the options
    torch.save({"options": plain}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert options_from_dict(TrainOptions, loaded["options"], "ckpt.pt") == opts


def test_options_from_dict_validates_and_names_its_source():
    with pytest.raises(ValueError, match="ckpt.pt: unknown option 'num_sample'"):
        options_from_dict(TrainOptions, {"num_sample": 2}, "ckpt.pt")
    with pytest.raises(ValueError, match="ckpt.pt: num_samples: 'x'"):
        options_from_dict(TrainOptions, {"num_samples": "x"}, "ckpt.pt")
    with pytest.raises(ValueError, match="num_pred=3"):
        options_from_dict(TrainOptions, {"num_pred": 3}, "ckpt.pt")
    # Keys may be aliases (an options dict saved by the baseline's spellings) and values strings.
    opts = options_from_dict(TrainOptions, {"NUM_EPOCHS": "5", "LEARNING_RATE": "1e-3"}, "ckpt.pt")
    assert (opts.num_epochs, opts.learning_rate) == (5, 1e-3)


# --------------------------------------------------------------------------------------------
# Shipped presets
# --------------------------------------------------------------------------------------------


def test_shipped_presets_are_listed():
    assert {"baseline", "fast_cpu", "more_frames"} <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_every_shipped_preset_loads_validates_and_explains_each_line(name):
    path = PRESETS_DIR / f"{name}.yaml"
    opts = options_from_dict(TrainOptions, load_preset(TrainOptions, name), str(path))
    opts.validate()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            value, sep, reason = line.partition(" #")
            assert sep and reason.strip(), f"{path}:{number} has no '# reason': {line!r}"
    values = load_preset(TrainOptions, name)
    for key, value in values.items():  # presets hold only what differs from the defaults
        assert value != getattr(TrainOptions(), key), f"{path}: {key} repeats the default"


def test_baseline_preset_is_the_defaults():
    opts, _ = parse(["--preset", "baseline"])
    assert dataclasses.replace(opts, name=None) == TrainOptions()
    assert opts.name == "baseline"


def test_fast_cpu_preset():
    values = load_preset(TrainOptions, "fast_cpu")
    opts = options_from_dict(TrainOptions, values)
    # The demo's model: full-resolution patches, per-DOF normalised in-plane loss, from "no motion".
    assert (opts.model_name, opts.downsample, opts.label_type, opts.label_norm, opts.loss_dofs) == (
        "patch_flow", 1, "parameter", True, "in_plane")
    assert opts.identity_init and opts.num_workers <= 2


def test_cpu_hour_preset():
    opts = options_from_dict(TrainOptions, load_preset(TrainOptions, "cpu_hour"))
    assert (opts.model_name, opts.label_norm, opts.loss_dofs) == ("patch_flow", True, "in_plane")
    assert opts.max_steps is not None or opts.num_epochs < 10**6  # a bounded run


@pytest.mark.parametrize(("values", "message"), [
    ({"label_norm": True}, "per-DOF losses need label_type='parameter'"),
    ({"loss_dofs": "in_plane", "label_type": "point"}, "per-DOF losses need"),
    ({"loss": "l1_oop_mse", "label_type": "point"}, "loss='l1_oop_mse': per-DOF losses need"),
    ({"best_metric": "val_GPE", "val_scan_every": 0}, "best_metric='val_GPE' needs whole validation scans"),
    ({"model_name": "patch_flow", "label_type": "parameter", "num_samples": 4, "sample_range": 4},
     "patch_flow.*num_samples=2"),
    ({"model_name": "patch_flow", "label_type": "parameter", "patch_size": 36}, "patch_size=36: expected a multiple of 8"),
    ({"model_name": "patch_flow", "label_type": "parameter", "patch_size": 32}, "search_radius=8: expected 1..7"),
    ({"model_name": "patch_flow", "label_type": "parameter", "search_radius": 16}, "less than a quarter of patch_size=64"),
    ({"model_name": "patch_flow", "label_type": "parameter", "num_patches": 0}, "num_patches=0: must be positive"),
    ({"model_name": "patch_flow", "label_type": "parameter", "robust_iterations": -1}, "robust_iterations=-1"),
    ({"flip_prob": 1.5}, "flip_prob=1.5: must be in"),
    ({"gain_jitter": 1.0}, r"gain_jitter=1.0: must be in \[0, 1\)"),
    # Options of one model given to another would be ignored silently.
    ({"num_patches": 64}, "num_patches: options of model_name='patch_flow' or 'seq_flow'"),
    ({"robust_iterations": 3, "patch_size": 48}, "patch_size, robust_iterations: options of"),
])
def test_per_dof_options_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        options_from_dict(TrainOptions, values)


def test_more_frames_preset():
    opts = options_from_dict(TrainOptions, load_preset(TrainOptions, "more_frames"))
    assert (opts.num_samples, opts.sample_range, opts.num_pred) == (4, 4, 3)


# --------------------------------------------------------------------------------------------
# The generic machinery on other field types
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Toy:
    """A toy script's options."""

    ratio: float | None = option(None, "a ratio")
    tags: list[str] = option(["a"], "tags", choices=("a", "b", "c"))
    verbose: bool = option(False, "talk", aliases=("VERBOSE",))


def test_generic_types_and_list_choices(capsys):
    opts, _ = parse_options(_Toy, ["--ratio", "5e-1", "--tags", "b,c", "a", "--VERBOSE", "on"])
    assert opts == _Toy(ratio=0.5, tags=["b", "c", "a"], verbose=True)
    with pytest.raises(SystemExit):
        parse_options(_Toy, ["--tags", "a,d"])
    assert "'a,d'" in capsys.readouterr().err
    assert options_to_dict(_Toy()) == {"ratio": None, "tags": ["a"], "verbose": False}


def test_unsupported_field_type_is_a_type_error():
    @dataclasses.dataclass
    class Bad:
        table: dict = option(None, "no dicts")

    with pytest.raises(TypeError, match="table"):
        build_parser(Bad)


def test_importing_options_does_nothing_heavy():
    # Reading presets must not pay for torch (seconds); validate() imports the geometry lazily.
    code = "import sys, options; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
