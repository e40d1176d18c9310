"""Local window attention (Swin) and its shifted form, on an n_win x n_win grid of windows."""
import torch
from einops import rearrange

from .base import TokenMixer
from .partition import crop_hw, grid_cells, grouped_attention, pad_all, valid_map
from .registry import register_attention

WINDOWS = "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c"


def shifted_window_ids(size: int, cell: int, shift: int, device) -> torch.Tensor:
    """Window index along one axis after Swin's cyclic shift: the wrapped edge piece is its own window."""
    return (torch.arange(size, device=device) + cell - shift) // cell


@register_attention("window")
class WindowAttention(TokenMixer):
    """Each token attends to the tokens of its own window (windows of ceil(H/n_win) x ceil(W/n_win))."""

    pattern = WINDOWS  # how tokens are grouped; DilatedAttention swaps only this

    def mix(self, q, k, v):
        h, w = q.shape[1:3]
        wh, hp = grid_cells(h, self.n_win)
        ww, wp = grid_cells(w, self.n_win)
        out = grouped_attention(*pad_all((q, k, v), hp, wp), self.num_heads, self.scale, self.pattern,
                                dict(nh=self.n_win, nw=self.n_win, wh=wh, ww=ww),
                                valid=valid_map(h, w, hp, wp, q.device))
        return crop_hw(out, h, w)


@register_attention("shifted_window")
class ShiftedWindowAttention(TokenMixer):
    """Windows displaced by half a window (Swin's alternate blocks).

    A cyclic roll plus a mask that keeps the wrapped-around pieces apart, as Swin does; alternate it
    with `window` in consecutive blocks. A single window (n_win=1) covers the whole map and, as in Swin
    where the window is as large as the map, is not shifted: shifting would cut the map into four.
    """

    def mix(self, q, k, v):
        h, w = q.shape[1:3]
        wh, hp = grid_cells(h, self.n_win)
        ww, wp = grid_cells(w, self.n_win)
        sh, sw = (wh // 2, ww // 2) if self.n_win > 1 else (0, 0)
        q, k, v = (t.roll((-sh, -sw), dims=(1, 2)) for t in pad_all((q, k, v), hp, wp))
        sizes = dict(nh=self.n_win, nw=self.n_win, wh=wh, ww=ww)
        # segment of every rolled position: a token attends only within its own segment
        rows = shifted_window_ids(hp, wh, sh, q.device).roll(-sh)
        cols = shifted_window_ids(wp, ww, sw, q.device).roll(-sw)
        seg = rows[:, None] * (self.n_win + 1) + cols[None, :]
        seg = rearrange(seg[None, ..., None], WINDOWS, **sizes)[..., 0]  # (g, t)
        pair = seg[:, :, None] == seg[:, None, :]
        valid = valid_map(h, w, hp, wp, q.device)
        if valid is not None:
            valid = valid.roll((-sh, -sw), dims=(0, 1))
        out = grouped_attention(q, k, v, self.num_heads, self.scale, WINDOWS, sizes, valid=valid, pair_mask=pair)
        return crop_hw(out.roll((sh, sw), dims=(1, 2)), h, w)
