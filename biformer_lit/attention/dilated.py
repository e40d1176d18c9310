"""Dilated / grid attention (MaxViT's grid): tokens n_win apart along each axis form one group.

It differs from window attention by one pattern string: the group index is the fast axis.
"""
from .base import TokenMixer
from .partition import crop_hw, grid_cells, grouped_attention, pad_all, valid_map
from .registry import register_attention

GRID = "b (wh nh) (ww nw) c -> (b nh nw) (wh ww) c"


@register_attention("dilated")
class DilatedAttention(TokenMixer):
    """Token (r, c) attends to every token (r', c') with r' = r and c' = c modulo n_win."""

    def mix(self, q, k, v):
        h, w = q.shape[1:3]
        wh, hp = grid_cells(h, self.n_win)
        ww, wp = grid_cells(w, self.n_win)
        out = grouped_attention(*pad_all((q, k, v), hp, wp), self.num_heads, self.scale, GRID,
                                dict(nh=self.n_win, nw=self.n_win, wh=wh, ww=ww),
                                valid=valid_map(h, w, hp, wp, q.device))
        return crop_hw(out, h, w)
