"""Checkpoints: round trip under weights_only, atomic writes, readable errors, --init_weights loading."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import models
from utils import checkpoint as ckpt


def tiny_net(out_features=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(64, out_features))


def make_checkpoint(net, **changes):
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.rand(2, 2, 6, 6)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    checkpoint = {
        "format_version": ckpt.FORMAT_VERSION,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": None,
        "epoch": 4,
        "batch_in_epoch": 0,
        "step": 123,
        "best": {"epoch": 3, "val_loss": np.float64(0.25)},
        "options": {"NUM_SAMPLES": 2, "PRED_TYPE": "parameter", "DATA_PATH": Path("data"), "lr": 1e-3},
        "model_args": {"name": "tiny", "in_frames": 2, "pred_dim": 3},
        "rng": ckpt.rng_state(),
    }
    checkpoint.update(changes)
    return checkpoint


def test_round_trip_under_weights_only(tmp_path):
    model = tiny_net()
    checkpoint = make_checkpoint(model)
    path = ckpt.save_checkpoint(tmp_path / "last.pt", checkpoint)
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]

    loaded = ckpt.load_checkpoint(path)
    assert set(loaded) == set(ckpt.REQUIRED_KEYS)
    for key, value in model.state_dict().items():
        assert_close(loaded["model"][key], value, rtol=0, atol=0)
    assert loaded["optimizer"]["param_groups"][0]["lr"] == checkpoint["optimizer"]["param_groups"][0]["lr"]
    assert loaded["scheduler"] == checkpoint["scheduler"]
    assert (loaded["epoch"], loaded["batch_in_epoch"], loaded["step"]) == (4, 0, 123)
    # numpy scalars and paths are stored as builtins, so weights_only loading accepts them
    assert loaded["best"] == {"epoch": 3, "val_loss": 0.25} and type(loaded["best"]["val_loss"]) is float
    assert loaded["options"]["DATA_PATH"] == "data"
    assert torch.equal(loaded["rng"]["torch"], checkpoint["rng"]["torch"])

    # the optimiser state restores
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded["optimizer"])


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    first = torch.rand(3)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


def test_a_failing_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    model = tiny_net()
    path = ckpt.save_checkpoint(tmp_path / "last.pt", make_checkpoint(model, step=1))
    before = path.read_bytes()
    # a lambda cannot be pickled: torch.save fails after it has started writing
    with pytest.raises(Exception):
        ckpt.save_checkpoint(path, make_checkpoint(model, step=2, optimizer={"state": lambda: 0}))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(path)["step"] == 1


def test_save_refuses_incomplete_and_non_plain_checkpoints(tmp_path):
    model = tiny_net()
    checkpoint = make_checkpoint(model)
    del checkpoint["rng"], checkpoint["step"]
    with pytest.raises(ValueError, match=r"misses keys \['step', 'rng'\]"):
        ckpt.save_checkpoint(tmp_path / "a.pt", checkpoint)
    with pytest.raises(ValueError, match=r"options\['device'\] = device\(type='cpu'\)"):
        ckpt.save_checkpoint(tmp_path / "a.pt", make_checkpoint(model, options={"device": torch.device("cpu")}))
    with pytest.raises(ValueError, match="format_version=2; expected 1"):
        ckpt.save_checkpoint(tmp_path / "a.pt", make_checkpoint(model, format_version=2))
    assert os.listdir(tmp_path) == []


def test_save_strips_the_ddp_prefix(tmp_path):
    model = tiny_net()
    wrapped = torch.nn.DataParallel(model)
    assert ckpt.unwrap_model(wrapped) is model
    path = ckpt.save_checkpoint(tmp_path / "c.pt", make_checkpoint(model, model=wrapped.state_dict()))
    assert set(ckpt.load_checkpoint(path)["model"]) == set(model.state_dict())


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        ckpt.load_checkpoint(missing)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt is not a readable PyTorch checkpoint"):
        ckpt.load_checkpoint(garbage)

    a_list = tmp_path / "list.pt"
    torch.save([1, 2], a_list)
    with pytest.raises(ValueError, match="list.pt holds a list, not a checkpoint dict"):
        ckpt.load_checkpoint(a_list)

    bare = tmp_path / "bare.pt"
    torch.save(tiny_net(out_features=1)[0].state_dict(), bare)
    with pytest.raises(ValueError, match=r"bare.pt misses checkpoint keys \['format_version'.*--init_weights"):
        ckpt.load_checkpoint(bare)

    model = tiny_net()
    future = tmp_path / "future.pt"
    checkpoint = make_checkpoint(model)
    checkpoint["format_version"] = 99
    torch.save(checkpoint | {"options": {}, "best": {}}, future)
    expected = "future.pt has checkpoint format_version=99; this code reads format_version=1"
    with pytest.raises(ValueError, match=expected):
        ckpt.load_checkpoint(future)


def test_init_weights_from_a_bare_data_parallel_state_dict(tmp_path):
    source = models.build_model("efficientnet_b1", 2, 6)
    path = tmp_path / "model_weights.pth"
    # the baseline's released weights: torch.save(model.state_dict()) of a DataParallel model
    torch.save(torch.nn.DataParallel(source).state_dict(), path)
    target = models.build_model("efficientnet_b1", 2, 6)
    assert ckpt.load_model_weights(target, path) is target
    for key, value in source.state_dict().items():
        assert_close(target.state_dict()[key], value, rtol=0, atol=0)

    # into a wrapped model, too
    wrapped = torch.nn.DataParallel(models.build_model("efficientnet_b1", 2, 6))
    ckpt.load_model_weights(wrapped, path)
    assert_close(wrapped.module.classifier[1].weight, source.classifier[1].weight, rtol=0, atol=0)


def test_init_weights_mismatch_names_file_and_keys(tmp_path):
    path = tmp_path / "model_weights.pth"
    torch.save(models.build_model("efficientnet_b1", 2, 6).state_dict(), path)
    with pytest.raises(ValueError) as info:
        ckpt.load_model_weights(models.build_model("efficientnet_b1", 3, 12), path)
    message = str(info.value)
    assert "model_weights.pth" in message
    assert "features.0.0.weight (32, 2, 3, 3) vs model (32, 3, 3, 3)" in message
    assert "classifier.1.weight (6, 1280) vs model (12, 1280)" in message

    with pytest.raises(ValueError) as info:
        ckpt.load_model_weights(models.build_model("resnet18", 2, 6), path)
    message = str(info.value)
    assert "missing keys: conv1.weight" in message and "unexpected keys: features.0.0.weight" in message
    assert "in all)" in message  # long lists are cut


def test_model_from_checkpoint_and_init_weights_from_our_checkpoint(tmp_path):
    model = models.build_model("resnet18", 2, 6)
    checkpoint = make_checkpoint(tiny_net(), model=model.state_dict(), optimizer=None, scheduler=None,
                                 model_args=models.model_args("resnet18", 2, 6))
    path = ckpt.save_checkpoint(tmp_path / "best.pt", checkpoint)

    rebuilt = ckpt.model_from_checkpoint(ckpt.load_checkpoint(path))
    assert not rebuilt.training
    frames = torch.rand(2, 2, 48, 64)
    with torch.no_grad():
        assert_close(rebuilt(frames), model.eval()(frames), rtol=0, atol=0)

    fresh = models.build_model("resnet18", 2, 6)
    ckpt.load_model_weights(fresh, path)
    assert_close(fresh.fc.weight, model.fc.weight, rtol=0, atol=0)


def test_patch_flow_checkpoints_from_before_patch_selection_keep_their_texture_patches(tmp_path):
    """Such checkpoints were trained picking the most textured patches; the default is now the
    speckle rule, so loading one must say "texture" (for prediction and for --resume), while a
    checkpoint that names its selection keeps it."""
    net = models.build_model("patch_flow", 2, 6, pixel_mm=[0.2, 0.2])
    old_args = {"name": "patch_flow", "in_frames": 2, "pred_dim": 6, "kwargs": {"pixel_mm": [0.2, 0.2]}}
    # (make_checkpoint's optimiser step runs a tiny net; the checkpoint holds patch_flow's weights.)
    old = make_checkpoint(tiny_net(), model=net.state_dict(), model_args=old_args,
                          options={"model_name": "patch_flow", "num_samples": 2})
    loaded = ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path / "old.pt", old))
    assert loaded["model_args"]["kwargs"]["patch_selection"] == "texture"
    assert loaded["options"]["patch_selection"] == "texture"
    assert ckpt.model_from_checkpoint(loaded).patch_selection == "texture"

    new_args = {**old_args, "kwargs": {"pixel_mm": [0.2, 0.2], "patch_selection": "speckle"}}
    new = make_checkpoint(tiny_net(), model=net.state_dict(), model_args=new_args,
                          options={"model_name": "patch_flow", "patch_selection": "speckle"})
    loaded = ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path / "new.pt", new))
    assert ckpt.model_from_checkpoint(loaded).patch_selection == "speckle"
    assert loaded["options"]["patch_selection"] == "speckle"
    # Other models are left as they are.
    other = ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path / "tiny.pt", make_checkpoint(tiny_net())))
    assert "patch_selection" not in other["options"] and "kwargs" not in other["model_args"]
