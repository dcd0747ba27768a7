"""Views + valid mask -> per-view line probability and the disparity of the first view pair.

This is the network half of the dislocation pipeline; geometry (lines, triangulation,
crystallography) lives in :mod:`livestereo.compute`.  The same object serves the live daemon
(snapshots of partially filled scans) and ``livestereo reconstruct``.

Disparity convention: position in view 0 minus position in view 1, projected on the baseline
direction u = (theta_1 - theta_0)/|theta_1 - theta_0|, in scan px, on view 0's scan grid
(= the rectified disparity of :mod:`livestereo.compute.rectify`; positive above focus).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from livestereo.compute.rectify import rectification_for
from livestereo.inference.weights import DEFAULT_DETECTOR, DEFAULT_STEREO, build_model
from livestereo.synth.normalise import normalise_view

#: training pairs had |d| <= 22 px; beyond that the pair is binned before matching
TRAINED_MAX_DISPARITY_PX = 22.0


def _pad_to(x: torch.Tensor, multiple: int, min_size: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    H = max(min_size, int(math.ceil(h / multiple) * multiple))
    W = max(min_size, int(math.ceil(w / multiple) * multiple))
    if (H, W) == (h, w):
        return x, (h, w)
    mode = "reflect" if (H - h) < h and (W - w) < w else "replicate"
    return F.pad(x, (0, W - w, 0, H - h), mode=mode), (h, w)


PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_has_bfloat16() -> bool:
    """True where the CPU does bfloat16 arithmetic natively (AMX tiles or AVX512-BF16)."""
    cpu = torch.cpu
    try:
        return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                    or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    except RuntimeError:
        return False


def precision_dtype(precision: str, device: torch.device, what: str = "detector") -> torch.dtype:
    """The dtype a network part (``what``: the detection UNet, or the stereo network's
    cost-volume branch) runs in for ``precision`` (one of PRECISIONS) on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"{what} precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bfloat16() else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def fuse_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every BatchNorm that directly follows a convolution in an nn.Sequential into the
    convolution's weights (eval mode only; same outputs up to rounding, ~10% faster on CPU)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for mod in list(model.modules()):
        if not isinstance(mod, torch.nn.Sequential):
            continue
        names = list(mod._modules)
        for a, b in zip(names[:-1], names[1:]):
            conv, bn = mod._modules[a], mod._modules[b]
            if isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)) and isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                mod._modules[a] = fuse_conv_bn_eval(conv, bn)
                mod._modules[b] = torch.nn.Identity()
    return model


class _StereoOutputs(torch.nn.Module):
    """The stereo network with tensor outputs (disparity, log sigma), for tracing."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(a, b)
        return out["disp"], out["log_sigma"]


class DislocationPipeline:
    """Detection UNet (every view) + stereo network (views 0 and 1).

    Use :meth:`load` to build it from the shipped weights (livestereo/weights/*.pt).
    Thread count: whatever torch.set_num_threads says; device: CUDA when available.

    On CPU, :meth:`warm` traces and freezes both networks (TorchScript ``freeze`` /
    ``optimize_for_inference``: weights as constants, pre-packed for oneDNN, fused ops) for
    the input shapes of one full scan: later calls at exactly those shapes (every finished
    scan of the run) use the frozen graphs, identical to the eager networks on the shipped
    weights (max difference 0.0 at 256x256) and ~15-20 % faster on one thread; any other
    shape (partial snapshots) runs eager.
    """

    def __init__(self, detector: torch.nn.Module, stereo: torch.nn.Module | None, device: torch.device,
                 info: dict[str, Any] | None = None, detector_precision: str = "auto",
                 volume_precision: str = "auto"):
        self.detector = fuse_batchnorm(detector.eval())
        self.stereo = fuse_batchnorm(stereo.eval()) if stereo is not None else None
        self.device = device
        self.info = info or {}
        self.detector_dtype = precision_dtype(detector_precision, device)
        """torch dtype the detection UNet runs in (float32, or bfloat16 where the CPU has it)."""
        self.detector.to(self.detector_dtype)
        if device.type == "cpu":
            self.detector.to(memory_format=torch.channels_last)
        self.volume_dtype = precision_dtype(volume_precision, device, "volume")
        """torch dtype of the stereo network's cost-volume branch: its half- and quarter-resolution
        features and 3D regulariser (the full-resolution features and refinement are float32)."""
        if self.stereo is not None:
            for part in (self.stereo.f2, self.stereo.f4, self.stereo.reg):
                part.to(self.volume_dtype)
        self._frozen: dict[tuple, torch.jit.ScriptModule] = {}
        self._frozen_lock = threading.Lock()
        self._tracing = threading.local()
        self.warmed: set[tuple] = set()
        """(K, ny, nx, geometry) view sets :meth:`warm` has prepared."""

    # ------------------------------------------------------------------ frozen graphs
    def _frozen_for(self, which: str, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):
        """The frozen graph of ``model`` for exactly these input shapes (traced now when
        :meth:`warm` is running in this thread), else None (run eager)."""
        if self.device.type != "cpu":
            return None
        key = (which,) + tuple((tuple(x.shape), tuple(x.stride())) for x in inputs)
        fz = self._frozen.get(key)
        if fz is None and getattr(self._tracing, "on", False):
            import warnings

            with self._frozen_lock:
                fz = self._frozen.get(key)
                if fz is None:
                    with warnings.catch_warnings(), torch.no_grad():
                        warnings.simplefilter("ignore")  # the shapes are baked in: that is the point
                        traced = torch.jit.trace(model, inputs, check_trace=False)
                        fz = torch.jit.freeze(traced) if which == "detector" else torch.jit.optimize_for_inference(traced)
                        for _ in range(2):  # the profiling executor optimises on the first runs
                            fz(*inputs)
                    if len(self._frozen) >= self.MAX_FROZEN:  # many runs of other shapes: start afresh
                        self._frozen.clear()
                        self.warmed.clear()
                    self._frozen[key] = fz
        return fz

    def warm(self, shape: tuple[int, int, int], centroids_mrad, scan_step_nm: float, thickness_nm: float) -> bool:
        """Trace and freeze the networks for a full scan of ``shape`` = (K, ny, nx) views at
        this geometry (a few tenths of a second, once); True if anything was done."""
        c = np.asarray(centroids_mrad, dtype=np.float64)
        key = (tuple(int(v) for v in shape), c.round(9).tobytes(), float(scan_step_nm), float(thickness_nm))
        if self.device.type != "cpu" or key in self.warmed:
            return False
        rng = np.random.default_rng(0)  # any non-flat content: only the shapes matter
        views = rng.random(shape, dtype=np.float32)
        self._tracing.on = True
        try:
            self.process(views, None, c, scan_step_nm, thickness_nm)
        finally:
            self._tracing.on = False
        self.warmed.add(key)
        return True

    @classmethod
    def load(cls, detector_weights: str | Path | None = None, stereo_weights: str | Path | None = None,
             device: str | torch.device | None = None, refine_iters: int | None = 1,
             detector_precision: str = "auto", volume_precision: str = "auto") -> "DislocationPipeline":
        """Build from weight files (default: the shipped ones).  A missing or unusable file
        raises :class:`livestereo.inference.weights.WeightsError` naming it.

        ``refine_iters``: full-resolution refinement steps of the stereo network (every step
        was supervised in training; the shipped net was trained with 2, and 1 is as accurate
        on the benchmark within noise and ~15 ms faster per 256x256 pair); None: as trained.

        ``detector_precision``: "float32", "bfloat16" or "auto" (bfloat16 on a CPU with
        native bfloat16 arithmetic (AMX or AVX512-BF16), where the UNet runs ~2.5x faster
        with the same detections within the benchmark's noise; else float32).

        ``volume_precision``: the same choice for the stereo network's cost-volume branch
        (its half- and quarter-resolution features and the 3D regulariser: about half the
        network's time, halved in bfloat16 with the same benchmark figures); the
        full-resolution features, the correlations, the soft-argmin and the sub-pixel
        refinement stay float32.
        """
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        det_path = Path(detector_weights) if detector_weights is not None else DEFAULT_DETECTOR
        st_path = Path(stereo_weights) if stereo_weights is not None else DEFAULT_STEREO
        det, det_blob = build_model(det_path, "detector", dev)
        st, st_blob = build_model(st_path, "stereo", dev)
        if refine_iters is not None:
            if refine_iters < 1:
                raise ValueError(f"refine_iters must be >= 1, got {refine_iters}")
            st.refine_iters = int(refine_iters)
        info = {"detector": str(det_path), "stereo": str(st_path),
                "detector_meta": det_blob.get("meta", {}), "stereo_meta": st_blob.get("meta", {})}
        return cls(det, st, dev, info, detector_precision, volume_precision)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check(views, valid, centroids_mrad, scan_step_nm, thickness_nm):
        if isinstance(views, (list, tuple)):
            shapes = [np.shape(x) for x in views]
            if len(set(shapes)) > 1:
                raise ValueError(f"all views must have the same shape, got {shapes}")
        try:
            v = np.asarray(views)
        except ValueError as exc:
            raise ValueError(f"views must be a (K, ny, nx) stack of equally shaped images ({exc})") from None
        if v.ndim == 2:
            v = v[None]
        if v.ndim != 3 or v.shape[0] < 1 or min(v.shape[1:]) < 1:
            raise ValueError(f"views must be a (K, ny, nx) stack of 2D images, got shape {np.shape(views)}")
        if not np.issubdtype(v.dtype, np.number) or np.iscomplexobj(v):
            raise ValueError(f"views must be real numbers, got dtype {v.dtype}")
        K, ny, nx = v.shape
        if valid is None:
            m = np.ones((ny, nx), bool)
        else:
            m = np.asarray(valid)
            if m.shape != (ny, nx):
                raise ValueError(f"valid mask has shape {m.shape}, the views are {ny}x{nx}")
            m = m.astype(bool)
        c = np.asarray(centroids_mrad, dtype=np.float64)
        if c.shape != (K, 2):
            raise ValueError(f"centroids_mrad must be (K, 2) = ({K}, 2) (theta_x, theta_y per view), got {c.shape}")
        if not np.all(np.isfinite(c)):
            raise ValueError("centroids_mrad contains NaN/inf")
        if not (np.isfinite(scan_step_nm) and scan_step_nm > 0):
            raise ValueError(f"scan_step_nm must be a positive number, got {scan_step_nm}")
        if not (np.isfinite(thickness_nm) and thickness_nm > 0):
            raise ValueError(f"thickness_nm must be a positive number, got {thickness_nm}")
        vf = v.astype(np.float32, copy=False)
        bad = ~np.isfinite(vf) & m[None]
        if bad.any():
            k = int(np.flatnonzero(bad.reshape(K, -1).any(1))[0])
            raise ValueError(f"view {k} has {int(bad[k].sum())} NaN/inf pixel(s) inside the valid mask "
                             f"({int(bad.sum())} in all views); mark unscanned pixels invalid instead")
        return vf, m, c

    # ------------------------------------------------------------------ parts
    @torch.inference_mode()
    def detect(self, views_norm: np.ndarray) -> np.ndarray:
        """Line probability (K, h, w) float32 for normalised views (K, h, w)."""
        x = torch.from_numpy(np.ascontiguousarray(views_norm, dtype=np.float32))[:, None].to(self.device)
        x, (h, w) = _pad_to(x, self.detector.multiple)
        x = x.to(self.detector_dtype)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        out = []
        for i in range(0, x.shape[0], 4):
            xi = x[i: i + 4]
            net = self._frozen_for("detector", self.detector, (xi,)) or self.detector
            out.append(torch.sigmoid(net(xi))[:, 0, :h, :w])
        return torch.cat(out).float().cpu().numpy()

    @torch.inference_mode()
    def match(self, a: np.ndarray, b: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Disparity x_A - x_B and its sigma (px) of a rectified pair (h, w) (baseline along +x)."""
        if not getattr(self.stereo, "use_prob", True):
            prob_a, prob_b = np.zeros_like(prob_a), np.zeros_like(prob_b)
        t = torch.from_numpy(np.stack([np.stack([a, prob_a]), np.stack([b, prob_b])]).astype(np.float32)).to(self.device)
        t, (h, w) = _pad_to(t, self.stereo.multiple, min_size=8)
        a_, b_ = t[:1], t[1:]
        fz = self._frozen_for("stereo", _StereoOutputs(self.stereo), (a_, b_))
        if fz is not None:
            disp, log_sigma = fz(a_, b_)
        else:
            out = self.stereo(a_, b_)
            disp, log_sigma = out["disp"], out["log_sigma"]
        d = disp[0, 0, :h, :w]
        s = torch.exp(log_sigma[0, 0, :h, :w].clamp(-5, 5)) * math.sqrt(2.0)
        return d.float().cpu().numpy(), s.float().cpu().numpy()

    # ------------------------------------------------------------------ all
    #: frozen graphs kept (a few MB each); more shapes than this clear the cache
    MAX_FROZEN = 8

    #: :meth:`process` takes ``cancelled`` (livestereo.inference.analysis.process_viewset)
    cancellable = True

    def process(self, views, valid, centroids_mrad, scan_step_nm: float, thickness_nm: float,
                cancelled=None) -> dict[str, Any] | None:
        """Line probabilities of every view and the disparity of views 0, 1.

        Args:
            views: (K, ny, nx) virtual images (any scale: each is normalised by robust
                percentiles of its valid pixels).
            valid: (ny, nx) bool, scanned positions (None: all); only the rows that hold
                valid pixels are processed.
            centroids_mrad: (K, 2) incident angle (theta_x, theta_y) of every view.
            scan_step_nm: scan step p (nm).
            thickness_nm: foil thickness (nm), bounds the disparity range (|d| <= beta t / p).
            cancelled: optional callable asked after the detection: True gives up (returns None).

        Returns:
            dict: prob (K, ny, nx) float32 (0 outside valid); disparity (ny, nx) float32 px
            (position in view 0 minus view 1 along theta_1 - theta_0, view-0 scan grid, NaN
            outside valid or with fewer than 2 views); sigma_disparity (ny, nx) float32 (px,
            NaN likewise); binning (int, the factor the pair was binned by before matching);
            rows (first, last+1) of the processed band.

        Raises:
            ValueError: mismatched shapes, NaN/inf inside valid, bad angles or scalars.
        """
        v, m, c = self._check(views, valid, centroids_mrad, scan_step_nm, thickness_nm)
        K, ny, nx = v.shape
        prob = np.zeros((K, ny, nx), np.float32)
        disp = np.full((ny, nx), np.nan, np.float32)
        sig = np.full((ny, nx), np.nan, np.float32)
        result = {"prob": prob, "disparity": disp, "sigma_disparity": sig, "binning": 1, "rows": (0, 0)}
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size == 0:
            return result
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        result["rows"] = (r0, r1)
        vm = m[r0:r1]
        vn = np.stack([normalise_view(v[k, r0:r1], vm) for k in range(K)])
        p = self.detect(vn) * vm[None]
        prob[:, r0:r1] = p
        if cancelled is not None and cancelled():
            return None
        if K < 2 or self.stereo is None:
            return result
        beta = float(np.hypot(*(c[1] - c[0])))
        if beta == 0.0:
            return result
        dmax = 1e-3 * beta * float(thickness_nm) / float(scan_step_nm)
        f = max(1, int(math.ceil(dmax / TRAINED_MAX_DISPARITY_PX)))
        result["binning"] = f
        h, w = vm.shape
        angle = math.atan2(c[1, 1] - c[0, 1], c[1, 0] - c[0, 0])
        quarter = round(angle / (math.pi / 2))
        # baselines along +-x or +-y: rectification is an exact quarter turn (no resampling)
        exact = abs(angle - quarter * math.pi / 2) < 1e-9
        if exact:
            k = quarter % 4
            ra, rb, pa, pb, rv = (np.ascontiguousarray(np.rot90(x, k)) for x in (vn[0], vn[1], p[0], p[1], vm))
        else:
            rect = rectification_for(c[0], c[1], (h, w))
            ra, va = rect.rectify(vn[0], vm, order=1, fill=0.0)
            rb, vb = rect.rectify(vn[1], vm, order=1, fill=0.0)
            pa, _ = rect.rectify(p[0], vm, order=1, fill=0.0)
            pb, _ = rect.rectify(p[1], vm, order=1, fill=0.0)
            rv = va & vb
        if f > 1:
            def binf(x, reduce=np.mean):
                H, W = x.shape
                Hc, Wc = -(-H // f) * f, -(-W // f) * f
                xp = np.pad(x, ((0, Hc - H), (0, Wc - W)), mode="edge")
                return reduce(xp.reshape(Hc // f, f, Wc // f, f), axis=(1, 3))
            # re-normalise after binning (noise drops, the network expects unit-range views);
            # probabilities are max-pooled so thin lines keep their strength
            ra_b, rb_b = normalise_view(binf(ra)), normalise_view(binf(rb))
            d_b, s_b = self.match(ra_b, rb_b, binf(pa, np.max), binf(pb, np.max))
            zoom = torch.nn.functional.interpolate
            dd = zoom(torch.from_numpy(np.stack([d_b, s_b]))[None], scale_factor=f, mode="bilinear", align_corners=False)[0]
            d_r = dd[0].numpy()[: ra.shape[0], : ra.shape[1]] * f
            s_r = dd[1].numpy()[: ra.shape[0], : ra.shape[1]] * f
        else:
            d_r, s_r = self.match(ra, rb, pa, pb)
        if exact:
            d_s, s_s, ok = np.rot90(d_r, -k), np.rot90(s_r, -k), vm
        else:
            d_s, ok = rect.unrectify(d_r, rv)
            s_s, _ = rect.unrectify(s_r, rv)
            ok = ok & vm
        disp[r0:r1] = np.where(ok & vm, d_s, np.nan)
        sig[r0:r1] = np.where(ok & vm, s_s, np.nan)
        return result
