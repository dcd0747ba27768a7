"""Function-preserving widening of a trained network (more channels, same function).

A fine-tuning phase may start a wider network from narrower trained weights
(``init_weights`` whose architecture has fewer channels): every old weight is copied to its
place, the new channels' incoming weights keep their fresh random initialisation, and
every weight from a new channel into an old one is zero. The old channels therefore
compute exactly what they computed before (the widened network gives the same output in
eval mode), while the new ones, seen by the loss through their zero outgoing weights,
start learning at once.

Supported: the detection UNet's ``base`` (all levels scale with it) and the stereo
network's ``vol_ch`` (3D cost-volume regulariser) and ``refine_ch`` (full-resolution
refinement). The stereo network's ``feat`` is not: its correlations are means over feature
channels, which new channels would change.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from livestereo.inference.weights import BUILDERS

#: architecture keys that may grow, per kind; every other key must match exactly
WIDENABLE = {"detector": ("base",), "stereo": ("vol_ch", "refine_ch")}
#: keys that change no parameter shape (free to differ)
_SHAPE_FREE = {"stereo": ("refine_iters", "use_prob")}


class WidenError(ValueError):
    """The two architectures differ in a way widening cannot bridge; the message says how.

    Attributes: ``key`` (the architecture key), ``old`` / ``new`` (its value in the weights and
    in the network asked for), ``how`` ("may only grow" | "must match").
    """

    def __init__(self, message: str, key: str = "", old: Any = None, new: Any = None, how: str = ""):
        super().__init__(message)
        self.key, self.old, self.new, self.how = key, old, new, how


def _full_arch(kind: str, arch: dict[str, Any]) -> dict[str, Any]:
    """``arch`` with the constructor's defaults for the keys it leaves out."""
    sig = inspect.signature(BUILDERS[kind])
    return {**{k: p.default for k, p in sig.parameters.items() if p.default is not p.empty}, **arch}


def check_widenable(kind: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """WidenError unless a network ``new`` (architecture keys) can start from weights of
    architecture ``old``: equal, or wider in the widenable keys only."""
    old, new = _full_arch(kind, old), _full_arch(kind, new)
    free = set(_SHAPE_FREE.get(kind, ()))
    grow = set(WIDENABLE.get(kind, ()))
    for k in sorted((set(old) | set(new)) - free):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k in grow and isinstance(a, int) and isinstance(b, int) and b > a:
            continue
        how = "may only grow" if k in grow else "must match"
        raise WidenError(f"{kind}: cannot start {k}={b!r} from weights with {k}={a!r} ({k} {how}; "
                         f"widenable: {', '.join(WIDENABLE.get(kind, ())) or 'nothing'})", k, a, b, how)


def _embed(new: torch.Tensor, old: torch.Tensor, in_idx: list[int] | None) -> None:
    """Copy ``old`` into the first rows (dim 0) of ``new``, at the columns ``in_idx`` (dim 1;
    None: the first ones); the other columns of those rows become zero."""
    n = old.shape[0]
    with torch.no_grad():
        if old.dim() == 1:
            new[:n] = old
            return
        cols = torch.arange(old.shape[1]) if in_idx is None else torch.as_tensor(in_idx)
        new[:n] = 0
        new[:n, cols] = old


def _copy_bn(new: nn.Module, old: nn.Module) -> None:
    n = old.num_features
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name)[:n] = getattr(old, name)
        new.num_batches_tracked.copy_(old.num_batches_tracked)


def _conv(new: nn.Module, old: nn.Module, in_idx: list[int] | None) -> None:
    """Old filters into the first rows; their weights from new input channels zero."""
    _embed(new.weight, old.weight, in_idx)
    if old.bias is not None:
        _embed(new.bias, old.bias, None)


def _block(new: nn.Sequential, old: nn.Sequential, in_idx: list[int] | None) -> list[int]:
    """conv-BN-ReLU(-conv-BN-ReLU) chain; returns the old output channels' new indices."""
    idx = in_idx
    for mn, mo in zip(new, old):
        if isinstance(mo, nn.Sequential):
            idx = _block(mn, mo, idx)
        elif isinstance(mo, (nn.Conv2d, nn.Conv3d)):
            _conv(mn, mo, idx)
            idx = list(range(mo.weight.shape[0]))
        elif isinstance(mo, nn.modules.batchnorm._BatchNorm):
            _copy_bn(mn, mo)
    return idx


def _widen_unet(new: nn.Module, old: nn.Module) -> None:
    idx = None  # the input image channels: unchanged
    enc_out = []
    for mn, mo in zip(new.enc, old.enc):
        idx = _block(mn, mo, idx)
        enc_out.append(idx)
    for j, (un, uo, dn, do) in enumerate(zip(new.up, old.up, new.dec, old.dec)):
        _conv(un, uo, idx)
        c_new = un.weight.shape[0]
        skip = enc_out[-2 - j]
        cat = list(range(uo.weight.shape[0])) + [c_new + i for i in skip]  # cat([up(x), skip])
        idx = _block(dn, do, cat)
    _conv(new.head, old.head, idx)


def _widen_stereo(new: nn.Module, old: nn.Module) -> None:
    for name in ("f1", "f2", "f4"):  # feature extractor: same shapes
        getattr(new, name).load_state_dict(getattr(old, name).state_dict())
    _block(new.reg, old.reg, None)
    _block(new.refine, old.refine, None)


_WIDEN = {"detector": _widen_unet, "stereo": _widen_stereo}


def widen_into(new: nn.Module, new_arch: dict[str, Any], old: nn.Module, old_arch: dict[str, Any], kind: str) -> None:
    """Load ``old`` (architecture ``old_arch``) into the wider ``new`` (``new_arch``), keeping
    its function; WidenError if the architectures differ in anything but widenable keys."""
    check_widenable(kind, old_arch, new_arch)
    _WIDEN[kind](new, old)


def load_init(model: nn.Module, arch: dict[str, Any], init: nn.Module, init_arch: dict[str, Any], kind: str) -> bool:
    """Start ``model`` from ``init``: the same architecture loads as is, a wider one is
    widened (:func:`widen_into`). Returns True when it widened."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if shapes == {k: v.shape for k, v in init.state_dict().items()}:
        model.load_state_dict(init.state_dict())
        return False
    widen_into(model, arch, init, init_arch, kind)
    return True
