"""Inference: the only package that imports torch (design.md section 2).

- unet.UNet: per-view dislocation line probability;
- stereo_net.StereoNet: GC-Net-like cost-volume stereo on rectified pairs;
- weights: shipped weights (livestereo/weights/*.pt), loaded with weights_only=True;
- pipeline.DislocationPipeline: views + valid mask -> probability maps + disparity;
- train: train_detector / train_stereo on synthetic data (livestereo.synth).

Submodules are imported lazily so ``import livestereo.inference`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DislocationPipeline", "WeightsError", "WeightsNotFoundError"]


def __getattr__(name: str) -> Any:
    if name == "DislocationPipeline":
        return importlib.import_module("livestereo.inference.pipeline").DislocationPipeline
    if name in ("WeightsError", "WeightsNotFoundError"):
        return getattr(importlib.import_module("livestereo.inference.weights"), name)
    raise AttributeError(name)
