"""GC-Net-like stereo network for rectified pairs (baseline along +x), with sub-pixel output.

Disparity convention: d = x_A - x_B (px), i.e. the feature at column x in view A sits at
column x - d in view B; both signs occur (features above and below the probe crossover).

Architecture:
1. a shared 2D feature extractor on each view (inputs: normalised image + detection
   probability), giving full-resolution features and quarter-resolution features;
2. a group-wise correlation cost volume at quarter resolution over the signed disparities
   -D..D (quarter-res px), regularised by 3D convolutions, and a soft-argmin -> coarse
   disparity;
3. a full-resolution refinement: view B's features are warped by the upsampled coarse
   disparity, a local correlation over -R..R px is computed, and a 2D conv net predicts the
   residual (applied ``refine_iters`` times with shared weights) and log sigma.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _cbr(cin, cout, stride=1, dil=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dil, dilation=dil, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Conv3x3x3(nn.Conv3d):
    """3x3x3 Conv3d (padding 1) computed as one batched Conv2d over the disparity slices.

    Same parameters and result (up to float rounding, ~1e-6) as nn.Conv3d, but runs on the
    fast 2D (oneDNN) kernels: on CPU torch falls back to a slow 3D convolution that is ~7x
    slower at these sizes. Each slice d goes once through a 2D convolution with the three
    depth taps' kernels stacked as output channels (3 x C_out), and output slice d sums tap
    0 of slice d-1, tap 1 of slice d and tap 2 of slice d+1: no 3 x C_in stacked copy of the
    input (2-4x faster than convolving such a copy). Output and input are (B, C, D, H, W)
    views of (B, D, C, H, W) memory, so consecutive layers need no copies between them.
    """

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__(cin, cout, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, D, H, W = x.shape
        co = self.out_channels
        xs = x.permute(0, 2, 1, 3, 4).reshape(B * D, C, H, W)
        w = self.weight.permute(2, 0, 1, 3, 4).reshape(3 * co, C, 3, 3)  # tap-major: (tap, out) rows
        y = F.conv2d(xs, w, None, padding=1).view(B, D, 3, co, H, W)
        out = y[:, :, 1].clone()
        if D > 1:
            out[:, 1:] += y[:, :-1, 0]   # cost slice d-1 through tap 0
            out[:, :-1] += y[:, 1:, 2]   # cost slice d+1 through tap 2
        if self.bias is not None:
            out += self.bias.view(1, 1, co, 1, 1)
        return out.permute(0, 2, 1, 3, 4)


def _cbr3(cin, cout):
    return nn.Sequential(Conv3x3x3(cin, cout, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class StereoNet(nn.Module):
    def __init__(self, in_ch: int = 2, feat: int = 16, max_disp_q: int = 6, groups: int = 8,
                 vol_ch: int = 8, refine_ch: int = 16, radius: int = 2, refine_iters: int = 2,
                 use_prob: bool = True):
        super().__init__()
        self.use_prob = use_prob  # False: trained with a zero probability channel
        self.max_disp_q = max_disp_q
        self.groups = groups
        self.radius = radius
        self.refine_iters = refine_iters
        self.f1 = nn.Sequential(_cbr(in_ch, feat), _cbr(feat, feat))
        self.f2 = nn.Sequential(_cbr(feat, 2 * feat, stride=2), _cbr(2 * feat, 2 * feat))
        self.f4 = nn.Sequential(_cbr(2 * feat, 2 * feat, stride=2), _cbr(2 * feat, 2 * feat, dil=2),
                                nn.Conv2d(2 * feat, 2 * feat, 3, padding=1))
        self.reg = nn.Sequential(_cbr3(groups, vol_ch), _cbr3(vol_ch, vol_ch), _cbr3(vol_ch, vol_ch),
                                 Conv3x3x3(vol_ch, 1))
        nin = feat + (2 * radius + 1) + 2
        self.refine = nn.Sequential(_cbr(nin, refine_ch), _cbr(refine_ch, refine_ch, dil=2),
                                    _cbr(refine_ch, refine_ch, dil=4), _cbr(refine_ch, refine_ch),
                                    nn.Conv2d(refine_ch, 2, 3, padding=1))

    @property
    def multiple(self) -> int:
        return 4

    @property
    def max_disp(self) -> int:
        """Largest |disparity| (full-resolution px) the cost volume covers."""
        return 4 * self.max_disp_q

    def _volume(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        B, C, H, W = fa.shape
        g = self.groups
        fa = fa.view(B, g, C // g, H, W)
        fb = fb.view(B, g, C // g, H, W)
        D = self.max_disp_q
        vols = []
        for d in range(-D, D + 1):
            # cost(x, d) = <fa(x), fb(x - d)>
            if d > 0:
                v = F.pad((fa[..., d:] * fb[..., :-d]).mean(2), (d, 0))
            elif d < 0:
                v = F.pad((fa[..., :d] * fb[..., -d:]).mean(2), (0, -d))
            else:
                v = (fa * fb).mean(2)
            vols.append(v)
        return torch.stack(vols, dim=2)  # (B, g, 2D+1, H, W)

    @staticmethod
    def _warp(f: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        """f sampled at (x - disp(x), y) with bilinear interpolation (zeros outside)."""
        B, C, H, W = f.shape
        xs = torch.arange(W, device=f.device, dtype=f.dtype).view(1, 1, W).expand(B, H, W)
        ys = torch.arange(H, device=f.device, dtype=f.dtype).view(1, H, 1).expand(B, H, W)
        gx = 2.0 * (xs - disp[:, 0]) / max(W - 1, 1) - 1.0
        gy = 2.0 * ys / max(H - 1, 1) - 1.0
        return F.grid_sample(f, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="zeros", align_corners=True)

    def _local_corr(self, fa: torch.Tensor, fbw: torch.Tensor) -> torch.Tensor:
        r = self.radius
        fbp = F.pad(fbw, (r, r))
        W = fa.shape[-1]
        # offset o: <fa(x), fbw(x - o)>, o = -r..r
        return torch.cat([(fa * fbp[..., r - o: r - o + W]).mean(1, keepdim=True) for o in range(-r, r + 1)], dim=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor):
        """a, b: (B, in_ch, H, W), H and W multiples of 4.

        Returns dict(disp, coarse, log_sigma, stages): (B, 1, H, W) tensors; ``stages`` lists
        the disparity after each refinement step (all are supervised in training, so
        ``refine_iters`` may be lowered at inference for speed).
        """
        B = a.shape[0]
        x = torch.cat([a, b], dim=0)
        f1 = self.f1(x)
        # the cost-volume branch (f2, f4, reg) may hold lower-precision weights (DislocationPipeline);
        # the correlations themselves stay in the inputs' precision
        f4 = self.f4(self.f2(f1.to(self.f4[-1].weight.dtype))).to(f1.dtype)
        fa1, fb1 = f1[:B], f1[B:]
        cost = self._volume(f4[:B], f4[B:])
        vol = self.reg(cost.to(self.reg[-1].weight.dtype)).to(cost.dtype).squeeze(1)  # (B, 2D+1, H/4, W/4)
        prob = torch.softmax(vol, dim=1)
        dvals = torch.arange(-self.max_disp_q, self.max_disp_q + 1, device=a.device, dtype=a.dtype).view(1, -1, 1, 1)
        dq = (prob * dvals).sum(1, keepdim=True)
        coarse = F.interpolate(dq * 4.0, size=a.shape[-2:], mode="bilinear", align_corners=False)
        disp = coarse
        log_sigma = torch.zeros_like(disp)
        stages = []
        for _ in range(self.refine_iters):
            corr = self._local_corr(fa1, self._warp(fb1, disp))
            out = self.refine(torch.cat([fa1, corr, disp / self.max_disp, a[:, -1:]], dim=1))
            disp = disp + out[:, :1]
            log_sigma = out[:, 1:2]
            stages.append(disp)
        return {"disp": disp, "coarse": coarse, "log_sigma": log_sigma, "stages": stages}
