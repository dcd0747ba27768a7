"""Small UNet giving a per-view dislocation line probability (logits out)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """``levels``-level UNet (channels base, 2 base, 4 base, ...); input (B, in_ch, H, W) with
    H, W multiples of 2**(levels-1); output (B, 1, H, W) line logits."""

    def __init__(self, in_ch: int = 1, base: int = 16, levels: int = 4):
        super().__init__()
        self.levels = levels
        chs = [base * 2**i for i in range(levels)]
        self.enc = nn.ModuleList()
        c = in_ch
        for ch in chs:
            self.enc.append(_block(c, ch))
            c = ch
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for ch in reversed(chs[:-1]):
            self.up.append(nn.Conv2d(c, ch, 1))
            self.dec.append(_block(2 * ch, ch))
            c = ch
        self.head = nn.Conv2d(c, 1, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.enc):
            if i:
                x = F.max_pool2d(x, 2)
            x = enc(x)
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            x = F.interpolate(up(x), size=skip.shape[-2:], mode="nearest")
            x = dec(torch.cat([x, skip], dim=1))
        return self.head(x)
