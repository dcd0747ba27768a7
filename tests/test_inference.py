"""Networks, weights, pipeline and a tiny training step (livestereo.inference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livestereo.inference.pipeline import DislocationPipeline
from livestereo.inference.stereo_net import StereoNet
from livestereo.inference.train import (
    DetectorTrainConfig,
    StereoTrainConfig,
    detector_batch,
    detector_loss,
    stereo_batch,
    stereo_loss,
    train_detector,
)
from livestereo.inference.unet import UNet
from livestereo.inference.weights import (
    DEFAULT_DETECTOR,
    DEFAULT_STEREO,
    WeightsError,
    WeightsNotFoundError,
    build_model,
    save_weights,
)
from livestereo.synth import SynthParams, make_views

TINY_DET = {"in_ch": 1, "base": 4, "levels": 3}
TINY_ST = {"in_ch": 2, "feat": 8, "max_disp_q": 2, "groups": 4, "vol_ch": 4, "refine_ch": 8, "refine_iters": 1}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    torch.manual_seed(0)
    det = save_weights(d / "det.pt", "detector", TINY_DET, UNet(**TINY_DET))
    st = save_weights(d / "st.pt", "stereo", TINY_ST, StereoNet(**TINY_ST))
    return det, st


def _pair(h=48, w=64, seed=0, K=2):
    return make_views(np.random.default_rng(seed), K, SynthParams(height=h, width=w))


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("path,kind", [(DEFAULT_DETECTOR, "detector"), (DEFAULT_STEREO, "stereo")])
def test_shipped_weights_load_weights_only(path, kind):
    assert path.is_file(), f"shipped weights missing: {path}"
    assert path.stat().st_size < 5 * 2**20
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert blob["kind"] == kind and isinstance(blob["arch"], dict)
    model, _ = build_model(path, kind)
    assert not model.training


def test_shipped_pipeline_shapes():
    pl = DislocationPipeline.load(device="cpu")
    q = _pair(64, 80, seed=1, K=3)
    r = pl.process(q["raw"], np.ones((64, 80), bool), q["thetas_mrad"], q["scan_step_nm"], q["thickness_nm"])
    assert r["prob"].shape == (3, 64, 80) and r["prob"].dtype == np.float32
    assert r["disparity"].shape == (64, 80) and r["sigma_disparity"].shape == (64, 80)
    assert np.all((r["prob"] >= 0) & (r["prob"] <= 1))


def test_missing_weights_name_the_file(tmp_path):
    missing = tmp_path / "nope" / "detector.pt"
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        build_model(missing, "detector")
    with pytest.raises(WeightsError, match="nope"):
        DislocationPipeline.load(detector_weights=missing)


def test_corrupt_weights_name_the_file(tmp_path, tiny_weights):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(WeightsError, match="corrupt.pt"):
        build_model(bad, "detector")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(tiny_weights[0].read_bytes()[:300])
    with pytest.raises(WeightsError, match="cut.pt"):
        build_model(cut, "detector")
    with pytest.raises(WeightsError, match="st.pt"):  # stereo weights where detector ones belong
        build_model(tiny_weights[1], "detector")
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "livestereo-weights-1", "kind": "detector", "state_dict": {}, "x": object()}, pickled)
    with pytest.raises(WeightsError, match="pickled.pt"):  # weights_only refuses arbitrary objects
        build_model(pickled, "detector")


# ----------------------------------------------------------------------------- pipeline
def test_pipeline_bad_inputs(tiny_weights):
    pl = DislocationPipeline.load(*tiny_weights, device="cpu")
    q = _pair()
    v, th, p, t = q["raw"], q["thetas_mrad"], q["scan_step_nm"], q["thickness_nm"]
    with pytest.raises(ValueError, match="valid mask"):
        pl.process(v, np.ones((48, 65), bool), th, p, t)
    with pytest.raises(ValueError, match="views"):
        pl.process([v[0], v[1][:, :-1]], None, th, p, t)
    with pytest.raises(ValueError, match="centroids"):
        pl.process(v, None, th[:1], p, t)
    bad = v.copy()
    bad[1, 5, 7] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        pl.process(bad, None, th, p, t)
    bad[1, 5, 7] = np.inf
    with pytest.raises(ValueError, match="view 1"):
        pl.process(bad, None, th, p, t)
    # NaN in an unscanned (invalid) pixel is fine
    valid = np.ones((48, 64), bool)
    valid[5, 7] = False
    bad[1, 5, 7] = np.nan
    pl.process(bad, valid, th, p, t)


def test_pipeline_partial_scan_and_any_baseline(tiny_weights):
    pl = DislocationPipeline.load(*tiny_weights, device="cpu")
    q = _pair(64, 64, seed=2)
    valid = np.zeros((64, 64), bool)
    valid[:40] = True
    valid[40, :20] = True
    for th in (q["thetas_mrad"], np.array([[0.0, -30.0], [0.0, 30.0]]), np.array([[30.0, 0.0], [-30.0, 0.0]])):
        r = pl.process(q["raw"], valid, th, q["scan_step_nm"], q["thickness_nm"])
        assert r["rows"] == (0, 41)
        assert np.all(r["prob"][:, ~valid] == 0)
        assert np.all(np.isnan(r["disparity"][~valid]))
        assert np.isfinite(r["disparity"][valid]).mean() > 0.5
    # nothing scanned yet
    r = pl.process(q["raw"], np.zeros((64, 64), bool), q["thetas_mrad"], 1.0, 100.0)
    assert np.all(np.isnan(r["disparity"])) and np.all(r["prob"] == 0)
    # a thick foil at a fine step: the pair is binned so |d| stays within the trained range
    r = pl.process(q["raw"], None, np.array([[-60.0, 0], [60.0, 0]]), 0.5, 400.0)
    assert r["binning"] == 5 and np.isfinite(r["disparity"]).all()


def test_warmed_pipeline_equals_eager(tiny_weights):
    """Frozen graphs (DislocationPipeline.warm) give the eager networks' maps for full scans of
    the warmed shape; other shapes (partial snapshots) stay eager and are unchanged."""
    q = _pair(64, 64, seed=3)
    for th in (q["thetas_mrad"], np.array([[30.0, 0.0], [-30.0, 0.0]]), np.array([[0.0, -30.0], [0.0, 30.0]])):
        eager = DislocationPipeline.load(*tiny_weights, device="cpu")
        warm = DislocationPipeline.load(*tiny_weights, device="cpu")
        args = (th, q["scan_step_nm"], q["thickness_nm"])
        assert warm.warm(q["raw"].shape, *args) and not warm.warm(q["raw"].shape, *args)  # once
        assert {k[0] for k in warm._frozen} == {"detector", "stereo"}
        partial = np.zeros((64, 64), bool)
        partial[:37] = True
        for valid in (None, np.ones((64, 64), bool), partial):
            a = eager.process(q["raw"], valid, *args)
            b = warm.process(q["raw"], valid, *args)
            for key in ("prob", "disparity", "sigma_disparity"):
                np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-5, err_msg=key)
                assert np.array_equal(np.isnan(b[key]), np.isnan(a[key]))
        assert len(warm._frozen) == 2  # the partial scan did not trace anything


def test_conv3x3x3_matches_conv3d():
    from livestereo.inference.stereo_net import Conv3x3x3

    torch.manual_seed(1)
    for bias in (True, False):
        for D in (1, 2, 7):
            m = Conv3x3x3(5, 3, bias=bias)
            x = torch.randn(2, 5, D, 9, 11)
            ref = torch.nn.functional.conv3d(x, m.weight, m.bias, padding=1)
            y = m(x)
            assert y.shape == ref.shape
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
            # and it trains: the gradients are Conv3d's
            x.requires_grad_(True)
            g = torch.autograd.grad(m(x).square().sum(), (x, m.weight))
            g_ref = torch.autograd.grad(torch.nn.functional.conv3d(x, m.weight, m.bias, padding=1).square().sum(),
                                        (x, m.weight))
            for a, b in zip(g, g_ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_pipeline_cancelled_after_detection(tiny_weights):
    pl = DislocationPipeline.load(*tiny_weights, device="cpu")
    q = _pair(48, 64, seed=4)
    args = (q["raw"], None, q["thetas_mrad"], q["scan_step_nm"], q["thickness_nm"])
    assert pl.process(*args, cancelled=lambda: True) is None
    assert pl.process(*args, cancelled=lambda: False) is not None


# ----------------------------------------------------------------------------- training
def test_detector_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = DetectorTrainConfig(size=32, batch_pairs=2, base_channels=4, levels=3, seed=5)
    x, y = detector_batch((5, 0), cfg)
    model = UNet(1, 4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = detector_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_stereo_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = StereoTrainConfig(size=32, batch_pairs=2, detector=None, synth={"max_disparity_px": 6.0, "n_objects": [8, 12]})
    a, b, d = stereo_batch((7, 0), cfg, None, torch.device("cpu"))
    assert torch.isfinite(d).any()
    model = StereoNet(**TINY_ST)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(5):
        loss = stereo_loss(model(a, b), d)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_train_detector_is_seeded_and_resumable(tmp_path):
    common = dict(size=32, batch_pairs=1, base_channels=4, levels=2, threads=0, warmup_steps=1, checkpoint_every=2)
    full = DetectorTrainConfig(steps=4, checkpoint=str(tmp_path / "a.ckpt"), out=str(tmp_path / "a.pt"), **common)
    r_full = train_detector(full, progress=False)
    part = DetectorTrainConfig(steps=4, checkpoint=str(tmp_path / "b.ckpt"), out=str(tmp_path / "b.pt"), **common)
    train_detector(part, progress=False, stop_at=2)  # interrupted after the checkpoint at step 2
    assert not (tmp_path / "b.pt").exists()
    rest = DetectorTrainConfig(steps=4, checkpoint=str(tmp_path / "b.ckpt"), out=str(tmp_path / "b.pt"), **common)
    r_res = train_detector(rest, resume=True, progress=False)
    assert len(r_res["history"]) == 4
    np.testing.assert_allclose(r_full["history"], r_res["history"], rtol=1e-4)
    m1, _ = build_model(tmp_path / "a.pt", "detector")
    m2, _ = build_model(tmp_path / "b.pt", "detector")
    for p1, p2 in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)


def test_train_config_rejects_unknown_keys(tmp_path):
    from livestereo.config import ConfigError, load_toml

    f = tmp_path / "t.toml"
    f.write_text("steps = 3\nbatch_size = 4\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_toml(f, DetectorTrainConfig)
    f.write_text("[synth]\ndoze = [1, 2]\n")
    with pytest.raises(ConfigError, match="doze"):
        load_toml(f, StereoTrainConfig)


def test_shipped_configs_parse():
    from pathlib import Path

    from livestereo.config import load_toml

    root = Path(__file__).resolve().parents[1]
    load_toml(root / "configs/train_detector.toml", DetectorTrainConfig)
    load_toml(root / "configs/train_stereo.toml", StereoTrainConfig)


def test_gpu_configs_continue_the_shipped_weights():
    """The GPU fine-tuning configs, as they are, fit the shipped (widened) networks."""
    from pathlib import Path

    from livestereo.config import load_toml
    from livestereo.inference.train import _preflight

    root = Path(__file__).resolve().parents[1]
    det = load_toml(root / "configs/train_detector_gpu.toml", DetectorTrainConfig)
    _preflight("detector", det, {"in_ch": 1, "base": det.base_channels, "levels": det.levels}, resume=False)
    st = load_toml(root / "configs/train_stereo_gpu.toml", StereoTrainConfig)
    arch = {"in_ch": 2, **{k: getattr(st, k) for k in ("feat", "max_disp_q", "groups", "vol_ch", "refine_ch", "radius")}}
    _preflight("stereo", st, arch, resume=False)


@pytest.mark.parametrize(
    ("model", "sets", "message"),
    [
        ("detector", ["init_weights=\"nope.pt\""], "init_weights: nope.pt: detector weights file not found"),
        ("detector", ["base_channels=12"], "base_channels = 12 cannot start from init_weights .*base_channels = 16"),
        ("stereo", ["feat=8"], "feat = 8 cannot start from init_weights .*feat must match.*set feat = 16"),
        ("stereo", ["detector=\"nope.pt\""], "detector: nope.pt: detector weights file not found"),
        ("detector", ["synth.dose=[5]"], r"synth.dose: expected a range \[low, high\]"),
        ("detector", ["synth.dose=[300, 3]"], r"synth.dose: expected a range"),
        ("detector", ["synth.p_double=3"], "synth.p_double: a probability"),
        ("detector", ["synth.materials=[\"Zr\"]"], "synth.materials: expected a list of names"),
        ("detector", ["synth.materials=\"Ni\""], "synth.materials: expected a list of names"),
        ("detector", ["synth.height=64"], "synth.height: set by the training config's size"),
    ],
)
def test_train_command_bad_config_is_named_before_training(tmp_path, capsys, model, sets, message):
    """Bad weights files, architectures and synth values stop ``livestereo train`` at once
    with a message naming the config key (no traceback, nothing written)."""
    import re
    from pathlib import Path

    from livestereo.cli import main

    root = Path(__file__).resolve().parents[1]
    argv = ["train", model, "--config", str(root / f"configs/train_{model}_gpu.toml"), "--no-progress",
            "--out", str(tmp_path / "w.pt"), "--checkpoint", str(tmp_path / "w.ckpt"), "--set", "workers=0"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "bad config" in err and re.search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "w.pt").exists() and not (tmp_path / "w.ckpt").exists()


def test_train_command_registered():
    from livestereo.cli import build_parser

    args = build_parser().parse_args(["train", "stereo", "--steps", "3", "--resume"])
    assert args.model == "stereo" and args.steps == 3 and args.resume


def test_worker_processes_feed_the_same_batches(tmp_path):
    """Batches made in DataLoader workers are those of the inline loop: same losses."""
    common = dict(size=32, batch_pairs=1, base_channels=4, levels=2, threads=0, warmup_steps=1, steps=3,
                  checkpoint_every=10)
    inline = DetectorTrainConfig(checkpoint=str(tmp_path / "a.ckpt"), out=str(tmp_path / "a.pt"), **common)
    pooled = DetectorTrainConfig(checkpoint=str(tmp_path / "b.ckpt"), out=str(tmp_path / "b.pt"), workers=2, **common)
    h_inline = train_detector(inline, progress=False)["history"]
    h_pooled = train_detector(pooled, progress=False)["history"]
    assert len(h_pooled) == 3
    np.testing.assert_allclose(h_inline, h_pooled, rtol=1e-5)


def test_detector_precision_choice(monkeypatch):
    from livestereo.inference import pipeline as pm

    cpu = torch.device("cpu")
    assert pm.precision_dtype("float32", cpu) == torch.float32
    assert pm.precision_dtype("bfloat16", cpu) == torch.bfloat16
    monkeypatch.setattr(pm, "cpu_has_bfloat16", lambda: False)
    assert pm.precision_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(pm, "cpu_has_bfloat16", lambda: True)
    assert pm.precision_dtype("auto", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="detector precision"):
        pm.precision_dtype("half", cpu)


def test_bfloat16_detector_finds_the_float32_lines():
    """The shipped UNet in bfloat16 gives the float32 detections: the same line pixels at the
    pipeline's threshold, probabilities within a few hundredths."""
    q = make_views(np.random.default_rng(11), 2, SynthParams(height=96, width=96, dose=(300.0, 300.0)))
    args = (q["thetas_mrad"], q["scan_step_nm"], q["thickness_nm"])
    f32 = DislocationPipeline.load(device="cpu", detector_precision="float32")
    b16 = DislocationPipeline.load(device="cpu", detector_precision="bfloat16")
    assert f32.detector_dtype == torch.float32 and b16.detector_dtype == torch.bfloat16
    a, b = f32.process(q["raw"], None, *args), b16.process(q["raw"], None, *args)
    assert b["prob"].dtype == np.float32
    assert np.abs(a["prob"] - b["prob"]).mean() < 0.01
    la, lb = a["prob"] > 0.5, b["prob"] > 0.5
    assert la.sum() > 50 and (la ^ lb).sum() <= 0.05 * la.sum()
    on = la[0]
    assert np.nanmedian(np.abs(a["disparity"] - b["disparity"])[on]) < 0.1


def test_dislocation_analysis_passes_the_detector_precision(tmp_path):
    from livestereo.inference.live import DislocationAnalysis

    for precision, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = DislocationAnalysis(tmp_path, detector_precision=precision, volume_precision=precision)
        a.prepare()
        assert a.error is None and a.pipeline.detector_dtype == dtype and a.pipeline.volume_dtype == dtype
        assert a.pipeline.stereo.reg[0][0].weight.dtype == a.pipeline.stereo.f4[-1].weight.dtype == dtype
        assert a.pipeline.stereo.f1[0][0].weight.dtype == torch.float32


def test_bfloat16_cost_volume_gives_the_float32_disparity():
    """The stereo network's cost-volume branch in bfloat16 (the rest float32): the same
    disparity on the line pixels within a few hundredths of a px, eager and frozen alike."""
    q = make_views(np.random.default_rng(12), 2, SynthParams(height=96, width=96, dose=(300.0, 300.0)))
    args = (q["thetas_mrad"], q["scan_step_nm"], q["thickness_nm"])
    f32 = DislocationPipeline.load(device="cpu", detector_precision="float32", volume_precision="float32")
    b16 = DislocationPipeline.load(device="cpu", detector_precision="float32", volume_precision="bfloat16")
    assert f32.volume_dtype == torch.float32 and b16.volume_dtype == torch.bfloat16
    a = f32.process(q["raw"], None, *args)
    b = b16.process(q["raw"], None, *args)
    assert b["disparity"].dtype == np.float32
    np.testing.assert_array_equal(a["prob"], b["prob"])
    on = a["prob"][0] > 0.5
    assert on.sum() > 50
    err = np.abs(a["disparity"] - b["disparity"])[on]
    assert np.nanmedian(err) < 0.03 and np.nanpercentile(err, 95) < 0.2
    b16.warm(q["raw"].shape, *args)
    c = b16.process(q["raw"], None, *args)
    np.testing.assert_allclose(c["disparity"], b["disparity"], atol=1e-3, equal_nan=True)
    with pytest.raises(ValueError, match="volume precision"):
        DislocationPipeline.load(device="cpu", volume_precision="half")
