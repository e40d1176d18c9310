"""Axial stripe attention (CSWin): half the heads attend within horizontal stripes, half within vertical ones
(with an odd head count the columns get the extra head)."""
from typing import Optional, Tuple

import torch
import torch.fx

from ..errors import UserError
from .base import TokenMixer
from .partition import crop_hw, fx_leaf, grid_cells, grouped_attention, pad_hw, partition, partition_valid, \
    unpartition, valid_map
from .registry import register_attention


@fx_leaf
def stripe_cells(size: int, stripe_width: Optional[int], n_win: int) -> Tuple[int, int]:
    """Stripe width along an axis of `size` tokens (default: the region edge) and the padded size."""
    sw = min(stripe_width, size) if stripe_width is not None else grid_cells(size, n_win)[0]
    return sw, -(-size // sw) * sw


@register_attention("axial")
class AxialAttention(TokenMixer):
    """Stripes `stripe_width` tokens wide (default: the region edge, ceil(size / n_win))."""

    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        if num_heads < 2:
            raise UserError(f"axial attention splits heads between rows and columns: "
                            f"num_heads={num_heads} must be >= 2")
        self.row_heads = num_heads // 2  # an odd count gives the extra head to the columns
        if self.stripe_width is not None and self.stripe_width < 1:
            raise UserError(f"stripe_width={self.stripe_width}; allowed: >= 1")

    def stripes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: bool, heads: int) -> torch.Tensor:
        h, w = q.shape[1], q.shape[2]
        sw, padded = stripe_cells(h if rows else w, self.stripe_width, self.n_win)
        hp, wp = (padded, w) if rows else (h, padded)
        gh, gw = (padded // sw, 1) if rows else (1, padded // sw)  # a stripe is a (sw x W) or (H x sw) group
        key_ok = partition_valid(valid_map(h, w, hp, wp, q.device), gh, gw)
        out = grouped_attention(partition(pad_hw(q, hp, wp), gh, gw), partition(pad_hw(k, hp, wp), gh, gw),
                                partition(pad_hw(v, hp, wp), gh, gw), heads, self.scale, key_ok)
        return crop_hw(unpartition(out, gh, gw, hp, wp), h, w)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # the first row_heads heads' channels go to row stripes, the rest to column stripes
        row_channels = self.row_heads * self.dim // self.num_heads
        split = [row_channels, self.dim - row_channels]
        qr, qc = q.split(split, dim=-1)
        kr, kc = k.split(split, dim=-1)
        vr, vc = v.split(split, dim=-1)
        rows = self.stripes(qr, kr, vr, True, self.row_heads)
        cols = self.stripes(qc, kc, vc, False, self.num_heads - self.row_heads)
        return torch.cat([rows, cols], dim=-1)


for _leaf in ("pad_hw", "crop_hw", "valid_map", "partition_valid", "grouped_attention", "stripe_cells"):
    torch.fx.wrap(_leaf)
