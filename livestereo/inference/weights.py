"""Saving and loading the shipped network weights (torch.load with weights_only=True).

A weights file is a plain dict: {"format": "livestereo-weights-1", "kind": "detector" |
"stereo", "arch": {constructor keyword arguments}, "state_dict": {name: tensor},
"meta": {training info}}.  Nothing but tensors and plain Python values is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from livestereo.inference.stereo_net import StereoNet
from livestereo.inference.unet import UNet

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_DETECTOR = WEIGHTS_DIR / "detector.pt"
DEFAULT_STEREO = WEIGHTS_DIR / "stereo.pt"
FORMAT = "livestereo-weights-1"
#: the network class of each kind of weights file
BUILDERS = {"detector": UNet, "stereo": StereoNet}


class WeightsError(RuntimeError):
    """A weights file that cannot be used; the message names the file."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """The weights file does not exist."""


def save_weights(path: str | Path, kind: str, arch: dict[str, Any], model: torch.nn.Module,
                 meta: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict with its architecture (atomically: temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": FORMAT,
        "kind": kind,
        "arch": dict(arch),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def read_weights(path: str | Path, kind: str) -> dict[str, Any]:
    """Load and check a weights file; WeightsError (naming the file) if missing or unusable."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: {kind} weights file not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, unsafe pickle, ...
        raise WeightsError(f"{path}: cannot read {kind} weights ({type(exc).__name__}: {exc})".split("\n")[0]) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "state_dict" not in blob:
        raise WeightsError(f"{path}: not a livestereo weights file (format {FORMAT!r} expected)")
    if blob.get("kind") != kind:
        raise WeightsError(f"{path}: holds {blob.get('kind')!r} weights, {kind!r} expected")
    return blob


def build_model(path: str | Path, kind: str, device: str | torch.device | None = None) -> tuple[torch.nn.Module, dict]:
    """The network of ``kind`` ("detector" | "stereo") with the weights of ``path``, in eval mode."""
    blob = read_weights(path, kind)
    try:
        model = BUILDERS[kind](**blob.get("arch", {}))
        model.load_state_dict(blob["state_dict"], strict=True)
    except (TypeError, RuntimeError, KeyError) as exc:
        raise WeightsError(f"{path}: weights do not fit the {kind} network ({str(exc).splitlines()[0]})") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model, blob
