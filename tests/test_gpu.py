"""CUDA inference and training (marked gpu; skipped where torch sees no CUDA device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livestereo.inference.pipeline import DislocationPipeline
from livestereo.synth import SynthParams, make_views

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")]


def test_cuda_pipeline_matches_cpu():
    """The shipped networks on CUDA (float32: 'auto' picks bfloat16 on CPUs only) give the CPU
    float32 maps: probabilities within 1e-3 on average, the same line pixels, sub-0.05 px
    disparity differences on them."""
    q = make_views(np.random.default_rng(5), 2, SynthParams(height=128, width=128, dose=(300.0, 300.0)))
    args = (q["thetas_mrad"], q["scan_step_nm"], q["thickness_nm"])
    cpu = DislocationPipeline.load(device="cpu", detector_precision="float32")
    gpu = DislocationPipeline.load(device="cuda")
    assert gpu.device.type == "cuda" and gpu.detector_dtype == torch.float32
    a, b = cpu.process(q["raw"], None, *args), gpu.process(q["raw"], None, *args)
    assert b["prob"].dtype == np.float32 and b["prob"].shape == a["prob"].shape
    assert np.abs(a["prob"] - b["prob"]).mean() < 1e-3
    la, lb = a["prob"] > 0.5, b["prob"] > 0.5
    assert la.sum() > 50 and (la ^ lb).sum() <= 0.01 * la.sum()
    on = la[0] & np.isfinite(a["disparity"]) & np.isfinite(b["disparity"])
    assert np.median(np.abs(a["disparity"] - b["disparity"])[on]) < 0.05


def test_cuda_training_steps_lower_the_loss(tmp_path):
    from livestereo.inference.train import DetectorTrainConfig, train_detector

    cfg = DetectorTrainConfig(seed=3, steps=30, batch_pairs=4, size=64, base_channels=8, levels=3, lr=3e-3,
                              warmup_steps=2, threads=0, checkpoint=str(tmp_path / "d.ckpt"),
                              out=str(tmp_path / "d.pt"), checkpoint_every=100)
    r = train_detector(cfg, progress=False)
    h = r["history"]
    assert len(h) == 30 and np.mean(h[-5:]) < np.mean(h[:5])
    blob = torch.load(tmp_path / "d.pt", weights_only=True)
    assert blob["meta"]["device"].startswith("cuda")
