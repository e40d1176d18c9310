"""Axial stripe attention (CSWin): half the heads attend within horizontal stripes, half within vertical ones
(with an odd head count the columns get the extra head)."""
import torch

from .base import TokenMixer
from .partition import crop_hw, grouped_attention, grid_cells, pad_all, valid_map
from .registry import register_attention

ROW_STRIPES = "b (ns sw) w c -> (b ns) (sw w) c"
COL_STRIPES = "b h (ns sw) c -> (b ns) (h sw) c"


@register_attention("axial")
class AxialAttention(TokenMixer):
    """Stripes `stripe_width` tokens wide (default: the region edge, ceil(size / n_win))."""

    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        if num_heads < 2:
            raise ValueError(f"axial attention splits heads between rows and columns: "
                             f"num_heads={num_heads} must be >= 2")
        self.row_heads = num_heads // 2  # an odd count gives the extra head to the columns
        if self.stripe_width is not None and self.stripe_width < 1:
            raise ValueError(f"stripe_width={self.stripe_width}; allowed: >= 1")

    def stripe(self, size: int) -> int:
        return min(self.stripe_width, size) if self.stripe_width else grid_cells(size, self.n_win)[0]

    def stripes(self, q, k, v, pattern: str, axis: int, heads: int) -> torch.Tensor:
        h, w = q.shape[1:3]
        sw = self.stripe(q.shape[axis])
        padded = -(-q.shape[axis] // sw) * sw
        hp, wp = (padded, w) if axis == 1 else (h, padded)
        sizes = dict(sw=sw, w=wp) if axis == 1 else dict(sw=sw, h=hp)
        out = grouped_attention(*pad_all((q, k, v), hp, wp), heads, self.scale, pattern, sizes,
                                valid=valid_map(h, w, hp, wp, q.device))
        return crop_hw(out, h, w)

    def mix(self, q, k, v):
        # the first row_heads heads' channels go to row stripes, the rest to column stripes
        row_channels = self.row_heads * self.dim // self.num_heads
        split = [row_channels, self.dim - row_channels]
        (qr, qc), (kr, kc), (vr, vc) = (t.split(split, dim=-1) for t in (q, k, v))
        rows = self.stripes(qr, kr, vr, ROW_STRIPES, 1, self.row_heads)
        cols = self.stripes(qc, kc, vc, COL_STRIPES, 2, self.num_heads - self.row_heads)
        return torch.cat([rows, cols], dim=-1)
