"""Function-preserving widening of trained networks (livestereo.inference.widen)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livestereo.inference.stereo_net import StereoNet
from livestereo.inference.train import DetectorTrainConfig, StereoTrainConfig, train_detector, train_stereo
from livestereo.inference.unet import UNet
from livestereo.inference.weights import build_model, save_weights
from livestereo.inference.widen import WidenError, load_init, widen_into

ST = {"in_ch": 2, "feat": 8, "max_disp_q": 2, "groups": 4, "vol_ch": 4, "refine_ch": 8, "refine_iters": 2}


def _trained_like(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights and batch-norm statistics far from their defaults (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g)
                t.copy_(r.abs() + 0.5 if name.endswith("running_var") else 0.3 * r)
    return model.eval()


def test_widened_unet_keeps_its_function():
    old = _trained_like(UNet(1, 6, 3), 0)
    new = UNet(1, 10, 3)
    widen_into(new, {"in_ch": 1, "base": 10, "levels": 3}, old, {"in_ch": 1, "base": 6, "levels": 3}, "detector")
    new.eval()
    x = torch.randn(2, 1, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(new(x), old(x), rtol=1e-5, atol=1e-5)
    # the new channels are live: their incoming weights are not zero, their outgoing ones are
    w = new.enc[1][0].weight
    assert w[12:].abs().sum() > 0 and w[:12, 6:].abs().sum() == 0


def test_widened_stereo_keeps_its_function():
    old = _trained_like(StereoNet(**ST), 1)
    arch = dict(ST, vol_ch=8, refine_ch=12)
    new = StereoNet(**arch)
    assert load_init(new, arch, old, ST, "stereo")
    new.eval()
    a, b = torch.randn(1, 2, 32, 48), torch.randn(1, 2, 32, 48)
    with torch.no_grad():
        o_new, o_old = new(a, b), old(a, b)
    for k in ("disp", "coarse", "log_sigma"):
        torch.testing.assert_close(o_new[k], o_old[k], rtol=1e-4, atol=1e-4)


def test_same_architecture_loads_as_is():
    old = _trained_like(StereoNet(**ST), 2)
    new = StereoNet(**ST)
    assert not load_init(new, ST, old, ST, "stereo")
    for p, q in zip(new.state_dict().values(), old.state_dict().values()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("kind", "old", "new", "match"),
    [
        ("detector", {"in_ch": 1, "base": 6, "levels": 3}, {"in_ch": 1, "base": 6, "levels": 4}, "levels"),
        ("detector", {"in_ch": 1, "base": 8, "levels": 3}, {"in_ch": 1, "base": 6, "levels": 3}, "may only grow"),
        ("stereo", ST, dict(ST, feat=16), "feat=16 .* must match"),
    ],
)
def test_unbridgeable_architectures_are_named(kind, old, new, match):
    build = UNet if kind == "detector" else StereoNet
    with pytest.raises(WidenError, match=match):
        widen_into(build(**new), new, build(**old), old, kind)


def test_training_starts_a_wider_net_from_narrow_weights(tmp_path):
    """init_weights with fewer channels: the first loss is the narrow net's own (same function)."""
    torch.manual_seed(0)
    narrow = save_weights(tmp_path / "n.pt", "detector", {"in_ch": 1, "base": 4, "levels": 2},
                          _trained_like(UNet(1, 4, 2), 3))
    common = dict(size=32, batch_pairs=1, levels=2, threads=0, warmup_steps=1, steps=2, lr=1e-9,
                  checkpoint_every=10, init_weights=str(narrow))
    r_narrow = train_detector(DetectorTrainConfig(base_channels=4, checkpoint=str(tmp_path / "a.ckpt"),
                                                  out=str(tmp_path / "a.pt"), **common), progress=False)
    r_wide = train_detector(DetectorTrainConfig(base_channels=6, checkpoint=str(tmp_path / "b.ckpt"),
                                                out=str(tmp_path / "b.pt"), **common), progress=False)
    # training mode: batch-norm uses batch statistics, which the old channels share exactly
    np.testing.assert_allclose(r_wide["history"][0], r_narrow["history"][0], rtol=1e-5)
    _, blob = build_model(tmp_path / "b.pt", "detector")
    assert blob["arch"]["base"] == 6


def test_stereo_training_widens_the_cost_volume(tmp_path):
    torch.manual_seed(0)
    narrow = save_weights(tmp_path / "s.pt", "stereo", ST, _trained_like(StereoNet(**ST), 4))
    arch = {k: v for k, v in ST.items() if k != "in_ch"}
    cfg = StereoTrainConfig(size=32, batch_pairs=1, threads=0, warmup_steps=1, steps=1, checkpoint_every=10,
                            detector=None, synth={"max_disparity_px": 6.0, "n_objects": [8, 12]},
                            checkpoint=str(tmp_path / "w.ckpt"), out=str(tmp_path / "w.pt"), init_weights=str(narrow),
                            **dict(arch, vol_ch=6))
    train_stereo(cfg, progress=False)
    _, blob = build_model(tmp_path / "w.pt", "stereo")
    assert blob["arch"]["vol_ch"] == 6
