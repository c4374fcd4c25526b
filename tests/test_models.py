"""Networks: the registry, and state-dict compatibility with the TUS-REC baseline's EfficientNet-B1."""

import subprocess
import sys

import pytest
import torch
import torchvision
from torch.testing import assert_close

import models
from conftest import REPO_ROOT


def baseline_efficientnet_b1(in_frames, pred_dim):
    """The baseline's network, built here independently as its utils/network.py builds it."""
    model = torchvision.models.efficientnet_b1(weights=None)
    model.features[0][0] = torch.nn.Conv2d(
        in_channels=in_frames,
        out_channels=model.features[0][0].out_channels,
        kernel_size=model.features[0][0].kernel_size,
        stride=model.features[0][0].stride,
        padding=model.features[0][0].padding,
        bias=model.features[0][0].bias,
    )
    model.classifier[1] = torch.nn.Linear(in_features=model.classifier[1].in_features, out_features=pred_dim)
    return model


def test_efficientnet_b1_matches_the_baseline_state_dict():
    torch.manual_seed(0)
    ours = models.build_model("efficientnet_b1", in_frames=2, pred_dim=6)
    baseline = baseline_efficientnet_b1(2, 6)
    ours_state, baseline_state = ours.state_dict(), baseline.state_dict()
    assert list(ours_state) == list(baseline_state)
    assert {k: v.shape for k, v in ours_state.items()} == {k: v.shape for k, v in baseline_state.items()}
    assert "features.0.0.bias" not in ours_state
    assert ours_state["features.0.0.weight"].shape == (32, 2, 3, 3)
    assert ours_state["classifier.1.weight"].shape == (6, 1280)

    ours.load_state_dict(baseline_state, strict=True)
    ours.eval()
    baseline.eval()
    frames = torch.rand(3, 2, 64, 80)
    with torch.no_grad():
        assert_close(ours(frames), baseline(frames), rtol=0, atol=0)


# Networks that take any window and output any width; patch_flow is a 2-frame, 6-parameter model, seq_flow
# predicts 6 parameters per consecutive pair (tests/test_patch_flow.py, tests/test_seq_flow.py).
WINDOW_MODELS = tuple(name for name in models.MODEL_NAMES if name not in ("patch_flow", "seq_flow"))


@pytest.mark.parametrize("name", WINDOW_MODELS)
@pytest.mark.parametrize(("in_frames", "height", "width"), [(2, 64, 80), (5, 48, 48)])
def test_every_model_gives_one_row_per_window(name, in_frames, height, width):
    pred_dim = 7 * in_frames
    model = models.build_model(name, in_frames, pred_dim).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_frames, height, width))
    assert out.shape == (2, pred_dim)
    assert torch.isfinite(out).all()


def test_model_args_rebuild_the_same_architecture():
    args = models.model_args("resnet18", 3, 12)
    assert args == {"name": "resnet18", "in_frames": 3, "pred_dim": 12}
    model = models.build_from_args(args)
    reference = models.build_model("resnet18", 3, 12)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }


def test_unknown_model_names_the_available_ones():
    with pytest.raises(ValueError, match="unknown model 'efficientnet_b9'") as info:
        models.build_model("efficientnet_b9", 2, 6)
    for name in models.MODEL_NAMES:
        assert name in str(info.value)
    assert models.MODEL_NAMES == tuple(sorted(models.MODEL_NAMES))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"name": "resnet18", "in_frames": 2}, "missing keys \\['pred_dim'\\]"),
        ({"name": "resnet18", "in_frames": 2, "pred_dim": 6, "depth": 3}, "unknown keys \\['depth'\\]"),
        ({"name": "resnet18", "in_frames": 0, "pred_dim": 6}, "in_frames=0"),
        ({"name": "resnet18", "in_frames": 2, "pred_dim": 6.0}, "pred_dim=6.0"),
    ],
)
def test_bad_model_args_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        models.build_from_args(args)


def test_register_model_refuses_a_second_builder_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("resnet18")(lambda in_frames, pred_dim: torch.nn.Identity())


def test_import_models_does_not_import_torchvision():
    code = "import sys, models; assert models.MODEL_NAMES; print('torchvision' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
