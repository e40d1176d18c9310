"""Axial stripe attention (CSWin): half the heads attend within horizontal stripes, half within vertical ones."""
import torch

from .base import TokenMixer
from .partition import grouped_attention, grid_cells, pad_hw, valid_map
from .registry import register_attention

ROW_STRIPES = "b (ns sw) w c -> (b ns) (sw w) c"
COL_STRIPES = "b h (ns sw) c -> (b ns) (h sw) c"


@register_attention("axial")
class AxialAttention(TokenMixer):
    """Stripes `stripe_width` tokens wide (default: the region edge, ceil(size / n_win))."""

    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        if num_heads % 2:
            raise ValueError(f"axial attention splits heads between rows and columns: "
                             f"num_heads={num_heads} must be even")
        if self.stripe_width is not None and self.stripe_width < 1:
            raise ValueError(f"stripe_width={self.stripe_width}; allowed: >= 1")

    def stripe(self, size: int) -> int:
        return min(self.stripe_width, size) if self.stripe_width else grid_cells(size, self.n_win)[0]

    def stripes(self, qkv, pattern: str, axis: int) -> torch.Tensor:
        h, w = qkv.shape[1:3]
        sw = self.stripe(qkv.shape[axis])
        padded = -(-qkv.shape[axis] // sw) * sw
        hp, wp = (padded, w) if axis == 1 else (h, padded)
        sizes = dict(sw=sw, w=wp) if axis == 1 else dict(sw=sw, h=hp)
        out = grouped_attention(pad_hw(qkv, hp, wp), self.num_heads // 2, self.scale, pattern, sizes,
                                valid=valid_map(h, w, hp, wp, qkv.device))
        return out[:, :h, :w]

    def mix(self, qkv):
        c = self.dim
        half = c // 2
        # channels [0, C/2) of q, k, v go to row stripes, [C/2, C) to column stripes
        rows = torch.cat([qkv[..., i * c:i * c + half] for i in range(3)], dim=-1)
        cols = torch.cat([qkv[..., i * c + half:(i + 1) * c] for i in range(3)], dim=-1)
        return torch.cat([self.stripes(rows, ROW_STRIPES, 1), self.stripes(cols, COL_STRIPES, 2)], dim=-1)
