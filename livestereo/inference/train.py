"""Training the detection UNet and the stereo network on synthetic data (livestereo.synth).

Both trainers are seeded (the batch of step i is drawn from numpy's Generator seeded with
(seed, i), so a resumed run sees the same data as an uninterrupted one), checkpoint every
``checkpoint_every`` steps (model, optimiser, scheduler, step), resume with ``resume=True``,
show a tqdm progress bar, use CUDA when present and write the final weights (small, shipped
in the package) with :func:`livestereo.inference.weights.save_weights`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.nn import functional as F
from tqdm import tqdm

from livestereo.config import ConfigError
from livestereo.inference.stereo_net import StereoNet
from livestereo.inference.unet import UNet
from livestereo.inference.weights import DEFAULT_DETECTOR, WeightsError, build_model, read_weights, save_weights
from livestereo.inference.widen import WIDENABLE, WidenError, check_widenable, load_init
from livestereo.synth import SynthParams, make_pair
from livestereo.synth.generate import MATERIALS

log = logging.getLogger(__name__)
_SYNTH_FIELDS = set(SynthParams.__dataclass_fields__)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_synth(v: dict[str, Any]) -> dict[str, Any]:
    """Each synth override is a known SynthParams field with a value of that field's form: a
    range ([lo, hi], lo <= hi, or one number) where the default is a range, a number where it
    is a number, known material names for ``materials``; the message names the key."""
    bad = sorted(set(v) - _SYNTH_FIELDS)
    if bad:
        raise ValueError(f"unknown synth setting(s) {bad}; known: {sorted(_SYNTH_FIELDS - {'height', 'width'})}")
    defaults = SynthParams()
    for key, val in v.items():
        default = getattr(defaults, key)
        if key in ("height", "width"):
            raise ValueError(f"synth.{key}: set by the training config's size, not here")
        if key == "materials":
            if not isinstance(val, (list, tuple)) or not val or any(n not in MATERIALS for n in val):
                raise ValueError(f"synth.materials: expected a list of names from {sorted(MATERIALS)}, got {val!r}")
        elif isinstance(default, tuple):
            ok = _is_number(val) or (isinstance(val, (list, tuple)) and len(val) == 2
                                     and all(_is_number(x) for x in val) and val[0] <= val[1])
            if not ok:
                raise ValueError(f"synth.{key}: expected a range [low, high] (low <= high) or one number, got {val!r}")
        elif not _is_number(val):
            raise ValueError(f"synth.{key}: expected a number, got {val!r}")
        elif key.startswith("p_") and not 0.0 <= val <= 1.0:
            raise ValueError(f"synth.{key}: a probability, expected 0 <= value <= 1, got {val!r}")
    return v


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int = Field(0, description="seed of the data stream and of the initial weights")
    steps: int = Field(3000, ge=1, description="optimiser steps")
    batch_pairs: int = Field(4, ge=1, description="synthetic pairs per step")
    size: int = Field(128, ge=16, description="height and width of the synthetic training images (px)")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (AdamW, warm-up then cosine decay)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    threads: int = Field(1, ge=0, description="torch CPU threads (0: leave torch's default)")
    workers: int = Field(0, ge=0, description="processes generating synthetic batches ahead of the optimiser "
                         "(0: in the training loop); every batch still comes from its own (seed, step), so "
                         "the data, and the weights up to float rounding, do not depend on it")
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")
    checkpoint: str = Field("out/checkpoints/train.ckpt", description="checkpoint file (resume reads it)")
    out: str = Field("livestereo/weights/model.pt", description="final weights file")
    synth: dict[str, Any] = Field(default_factory=dict, description="SynthParams overrides (ranges as [lo, hi])")
    max_seconds: float | None = Field(None, gt=0, description="time budget (s): stop after it and write the "
                                      "weights; the cosine decay then follows whichever of steps or time runs "
                                      "out first (so the run is no longer bit-reproducible)")
    init_weights: str | None = Field(None, description="start from these weights (a fine-tuning phase); the "
                                     "architecture keys must match, except that a wider network (detector "
                                     "base_channels, stereo vol_ch / refine_ch) is widened from them "
                                     "(livestereo.inference.widen)")

    @field_validator("synth")
    @classmethod
    def _synth_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_synth(v)

    def synth_params(self) -> SynthParams:
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in self.synth.items()}
        return SynthParams(height=self.size, width=self.size, **kw)


class DetectorTrainConfig(_Common):
    """configs/train_detector.toml"""

    checkpoint: str = "out/checkpoints/detector.ckpt"
    out: str = "livestereo/weights/detector.pt"
    base_channels: int = Field(12, ge=4, description="UNet channels at full resolution")
    levels: int = Field(4, ge=2, le=6, description="UNet levels")
    pos_weight: float = Field(3.0, gt=0, description="BCE weight of line pixels")
    dice_weight: float = Field(1.0, ge=0, description="weight of the soft-Dice term")
    dilate: int = Field(1, ge=0, le=3, description="target = centre line dilated by this many px")


class StereoTrainConfig(_Common):
    """configs/train_stereo.toml"""

    checkpoint: str = "out/checkpoints/stereo.ckpt"
    out: str = "livestereo/weights/stereo.pt"
    feat: int = Field(16, ge=4, description="feature channels at full resolution")
    max_disp_q: int = Field(6, ge=1, description="cost volume half range in quarter-resolution px")
    groups: int = Field(8, ge=1, description="group-wise correlation groups")
    vol_ch: int = Field(8, ge=1, description="3D conv channels")
    refine_ch: int = Field(16, ge=4, description="refinement channels")
    radius: int = Field(2, ge=1, description="local correlation radius of the refinement (px)")
    refine_iters: int = Field(2, ge=1, description="refinement iterations (shared weights)")
    detector: str | None = Field(
        "livestereo/weights/detector.pt",
        description="detector weights whose probability maps feed the stereo net (relative paths are tried "
        "from the working directory, then from the package's parent; None: a zero channel)")
    use_detector: bool = Field(True, description="feed the detector's probability maps as a second channel "
                               "(False: a zero channel, independent of the detector)")
    coarse_weight: float = Field(0.5, ge=0, description="loss weight of the coarse (cost volume) disparity")
    sigma_weight: float = Field(0.1, ge=0, description="weight of the Laplace NLL that trains log sigma")


#: the training-config key of an architecture key, where they differ (for messages)
_CONFIG_KEY = {"base": "base_channels"}


def _weights_path(path: str | Path) -> Path:
    """A weights path from a config: relative paths are tried from the working directory,
    then from the package's parent (so the shipped configs work from anywhere)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        alt = DEFAULT_DETECTOR.parents[2] / path
        return alt if alt.exists() else path
    return path


def _preflight(kind: str, cfg: _Common, arch: dict[str, Any], resume: bool) -> None:
    """Before anything is trained: the weights files the config names exist, are readable and
    fit the network asked for; ConfigError naming the config key and the file otherwise."""
    if cfg.init_weights and not (resume and Path(cfg.checkpoint).is_file()):
        try:
            blob = read_weights(_weights_path(cfg.init_weights), kind)
            check_widenable(kind, blob.get("arch", {}), arch)
        except WeightsError as exc:
            raise ConfigError(f"init_weights: {exc}") from None
        except WidenError as exc:
            key = _CONFIG_KEY.get(exc.key, exc.key)
            fix = f"{exc.old!r} or more" if exc.how == "may only grow" else repr(exc.old)
            raise ConfigError(f"{key} = {exc.new!r} cannot start from init_weights {cfg.init_weights}, a {kind} "
                              f"network with {key} = {exc.old!r} ({key} {exc.how}); set {key} = {fix}") from None
    if kind == "stereo" and cfg.use_detector and cfg.detector:
        try:
            read_weights(_weights_path(cfg.detector), "detector")
        except WeightsError as exc:
            raise ConfigError(f"detector: {exc}") from None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        m = out.copy()
        m[..., 1:, :] |= out[..., :-1, :]
        m[..., :-1, :] |= out[..., 1:, :]
        m[..., :, 1:] |= out[..., :, :-1]
        m[..., :, :-1] |= out[..., :, 1:]
        out = m
    return out


def detector_batch(step_seed: tuple[int, int], cfg: DetectorTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (2n, 1, S, S), targets (2n, 1, S, S)) for one step; both views of n pairs."""
    rng = np.random.default_rng(step_seed)
    sp = cfg.synth_params()
    pairs = [make_pair(rng, sp) for _ in range(cfg.batch_pairs)]
    x = np.concatenate([q["views"] for q in pairs])[:, None]
    y = _dilate(np.concatenate([q["masks"] for q in pairs]), cfg.dilate)[:, None]
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))


def detector_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 3.0, dice_weight: float = 1.0) -> torch.Tensor:
    """BCE (line pixels weighted by pos_weight) + soft Dice over the batch."""
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(pos_weight, device=logits.device))
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = 1.0 - (2 * inter + 1.0) / (p.sum() + target.sum() + 1.0)
    return bce + dice_weight * dice


def stereo_data(step_seed: tuple[int, int], cfg: StereoTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(views (n, 2, S, S), disparity target (n, 1, S, S), NaN off-line) for one step, on the CPU."""
    rng = np.random.default_rng(step_seed)
    sp = cfg.synth_params()
    pairs = [make_pair(rng, sp) for _ in range(cfg.batch_pairs)]
    v = torch.from_numpy(np.stack([q["views"] for q in pairs]))
    d = torch.from_numpy(np.stack([q["disparity"] for q in pairs]))[:, None]
    return v, d


def stereo_inputs(v: torch.Tensor, d: torch.Tensor, detector: torch.nn.Module | None,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(view A (n, 2, S, S), view B (n, 2, S, S), target) on ``device``: each view with its
    detection probability (or a zero channel) as the second channel."""
    v, d = v.to(device), d.to(device)
    n, _, S, _ = v.shape
    if detector is not None:
        with torch.no_grad():
            prob = torch.sigmoid(detector(v.reshape(2 * n, 1, S, S))).reshape(n, 2, S, S)
    else:
        prob = torch.zeros_like(v)
    a = torch.stack([v[:, 0], prob[:, 0]], dim=1)
    b = torch.stack([v[:, 1], prob[:, 1]], dim=1)
    return a, b, d


def stereo_batch(step_seed: tuple[int, int], cfg: StereoTrainConfig, detector: torch.nn.Module | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(view A (n, 2, S, S), view B (n, 2, S, S), disparity target (n, 1, S, S), NaN off-line)."""
    return stereo_inputs(*stereo_data(step_seed, cfg), detector, device)


class _StepBatches(torch.utils.data.Dataset):
    """Batch i is ``make((seed, start + i))``: the same data whichever process makes it."""

    def __init__(self, make, seed: int, start: int, stop: int):
        self.make, self.seed, self.start, self.stop = make, seed, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int):
        return self.make((self.seed, self.start + i))


def _batches(make, cfg: _Common, start: int):
    """Batches of steps start..cfg.steps-1, in order, from ``cfg.workers`` processes or inline."""
    if cfg.workers <= 0:
        return (make((cfg.seed, step)) for step in range(start, cfg.steps))
    loader = torch.utils.data.DataLoader(_StepBatches(make, cfg.seed, start, cfg.steps), batch_size=None,
                                         shuffle=False, num_workers=cfg.workers, prefetch_factor=4,
                                         worker_init_fn=_worker_init)
    return iter(loader)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def stereo_loss(out: dict[str, Any], target: torch.Tensor, coarse_weight: float = 0.5, sigma_weight: float = 0.1) -> torch.Tensor:
    """Smooth-L1 on the line pixels (finite target) for every refinement stage and the coarse
    estimate, plus a Laplace NLL that trains log sigma on the final error."""
    m = torch.isfinite(target)
    if not bool(m.any()):
        return out["disp"].sum() * 0.0
    t = target[m]
    loss = coarse_weight * F.smooth_l1_loss(out["coarse"][m], t)
    stages = out["stages"]
    for i, d in enumerate(stages):
        loss = loss + (0.5 if i < len(stages) - 1 else 1.0) * F.smooth_l1_loss(d[m], t)
    ls = out["log_sigma"][m].clamp(-5, 5)
    err = (out["disp"][m] - t).abs().detach()
    loss = loss + sigma_weight * (err * torch.exp(-ls) + ls).mean()
    return loss


def _lr_lambda(cfg: _Common, elapsed_fraction=lambda: 0.0):
    """Linear warm-up, then cosine decay to 2 % over the remaining steps, or over the time
    budget when ``elapsed_fraction()`` (share of cfg.max_seconds spent) is further along."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        q = max((step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps), elapsed_fraction())
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(q, 1.0)))
    return f


def _run(kind: str, cfg: _Common, model: torch.nn.Module, arch: dict, make_batch, prepare, loss_fn, resume: bool,
         progress: bool, stop_at: int | None = None) -> dict[str, Any]:
    """Optimise ``model``: step i trains on ``prepare(make_batch((seed, i)))`` (make_batch runs on the
    CPU, in worker processes when cfg.workers > 0; prepare moves to the device)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = _device()
    if cfg.init_weights and not (resume and Path(cfg.checkpoint).is_file()):
        init, blob = build_model(_weights_path(cfg.init_weights), kind)
        if load_init(model, arch, init, blob.get("arch", {}), kind):
            log.info("%s: initialised from %s, widened %s -> %s (the same function; new channels learn from "
                     "zero outgoing weights)", kind, cfg.init_weights,
                     {k: blob["arch"].get(k) for k in WIDENABLE[kind]}, {k: arch.get(k) for k in WIDENABLE[kind]})
        else:
            log.info("%s: initialised from %s", kind, cfg.init_weights)
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    clock = {"t0": time.perf_counter()}

    def elapsed_fraction() -> float:
        return (time.perf_counter() - clock["t0"]) / cfg.max_seconds if cfg.max_seconds else 0.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, elapsed_fraction))
    ckpt = Path(cfg.checkpoint)
    start = 0
    history: list[float] = []
    if resume and ckpt.is_file():
        st = torch.load(ckpt, map_location=dev, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start = int(st["step"])
        history = list(st.get("history", []))
        log.info("%s: resumed from %s at step %d", kind, ckpt, start)
    elif resume:
        log.warning("%s: no checkpoint at %s, starting from scratch", kind, ckpt)

    def save_ckpt(step: int) -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step, "history": history, "config": cfg.model_dump()}, tmp)
        tmp.replace(ckpt)

    model.train()
    t0 = clock["t0"] = time.perf_counter()
    ema = None
    steps_done = start
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {kind}", disable=not progress,
               dynamic_ncols=True)
    batches = _batches(make_batch, cfg, start)
    for step, batch in zip(bar, batches):
        loss = loss_fn(model, prepare(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        v = float(loss.detach())
        history.append(v)
        ema = v if ema is None else 0.98 * ema + 0.02 * v
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        steps_done = step + 1
        out_of_time = cfg.max_seconds is not None and time.perf_counter() - t0 >= cfg.max_seconds
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or out_of_time:
            save_ckpt(step + 1)
        if out_of_time:
            log.info("%s: time budget of %.0f s spent after step %d of %d", kind, cfg.max_seconds, step + 1, cfg.steps)
            break
        if stop_at is not None and step + 1 >= stop_at:  # simulated interruption (tests)
            bar.close()
            return {"history": history, "final_loss": float("nan"), "wall_s": time.perf_counter() - t0,
                    "out": None, "model": model}
    wall = time.perf_counter() - t0
    final = float(np.mean(history[-50:])) if history else float("nan")
    bar.close()
    meta = {"steps": steps_done, "steps_planned": cfg.steps, "seed": cfg.seed, "final_loss": final, "wall_s_last_run": wall, "device": str(dev),
            "config": cfg.model_dump_json()}
    if cfg.out:
        save_weights(cfg.out, kind, arch, model.cpu(), meta)
    return {"history": history, "final_loss": final, "wall_s": wall, "out": cfg.out, "model": model}


def train_detector(cfg: DetectorTrainConfig, resume: bool = False, progress: bool = True,
                   stop_at: int | None = None) -> dict[str, Any]:
    """Train the line-detection UNet; returns {history, final_loss, wall_s, out, model}.

    ``stop_at`` stops after that step without writing weights (as if interrupted).
    """
    torch.manual_seed(cfg.seed)
    arch = {"in_ch": 1, "base": cfg.base_channels, "levels": cfg.levels}
    _preflight("detector", cfg, arch, resume)
    model = UNet(**arch)
    dev = _device()

    def prepare(b):
        return b[0].to(dev), b[1].to(dev)

    def loss_fn(m, b):
        return detector_loss(m(b[0]), b[1], cfg.pos_weight, cfg.dice_weight)

    make = functools.partial(detector_batch, cfg=cfg)
    return _run("detector", cfg, model, arch, make, prepare, loss_fn, resume, progress, stop_at)


def train_stereo(cfg: StereoTrainConfig, resume: bool = False, progress: bool = True,
                 stop_at: int | None = None) -> dict[str, Any]:
    """Train the stereo network (detector maps as extra channels if cfg.detector is set)."""
    torch.manual_seed(cfg.seed)
    arch = {"in_ch": 2, "feat": cfg.feat, "max_disp_q": cfg.max_disp_q, "groups": cfg.groups, "vol_ch": cfg.vol_ch,
            "refine_ch": cfg.refine_ch, "radius": cfg.radius, "refine_iters": cfg.refine_iters,
            "use_prob": bool(cfg.use_detector and cfg.detector)}
    _preflight("stereo", cfg, arch, resume)
    model = StereoNet(**arch)
    dev = _device()
    detector = None
    if cfg.use_detector and cfg.detector:
        detector, _ = build_model(_weights_path(cfg.detector), "detector", dev)
        for p in detector.parameters():
            p.requires_grad_(False)

    def prepare(b):
        return stereo_inputs(b[0], b[1], detector, dev)

    def loss_fn(m, b):
        a, bb, d = b
        return stereo_loss(m(a, bb), d, cfg.coarse_weight, cfg.sigma_weight)

    make = functools.partial(stereo_data, cfg=cfg)
    return _run("stereo", cfg, model, arch, make, prepare, loss_fn, resume, progress, stop_at)
