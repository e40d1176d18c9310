"""Local window attention (Swin) and its shifted form, on an n_win x n_win grid of windows."""
from typing import Optional, Tuple

import torch
import torch.fx

from .base import TokenMixer
from .partition import crop_hw, fx_leaf, grid_cells, grouped_attention, pad_hw, partition, partition_valid, \
    unpartition, valid_map
from .registry import register_attention


def shifted_window_ids(size: int, cell: int, shift: int, device: torch.device) -> torch.Tensor:
    """Window index along one axis after Swin's cyclic shift: the wrapped edge piece is its own window."""
    return torch.div(torch.arange(size, device=device) + cell - shift, cell, rounding_mode="floor")


@fx_leaf
def shifted_window_masks(h: int, w: int, n: int, wh: int, ww: int, sh: int, sw: int,
                         device: torch.device) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Masks of the rolled, padded (n * wh, n * ww) map, in window layout: real keys (g, t) or None,
    and the (g, t, t) pairs that lie in the same segment (a token attends only within its own)."""
    hp, wp = n * wh, n * ww
    rows = shifted_window_ids(hp, wh, sh, device).roll(-sh)
    cols = shifted_window_ids(wp, ww, sw, device).roll(-sw)
    seg = rows[:, None] * (n + 1) + cols[None, :]
    seg = partition(seg[None, :, :, None], n, n)[0, :, :, 0]  # (g, t)
    pair = seg[:, :, None] == seg[:, None, :]
    valid = valid_map(h, w, hp, wp, device)
    if valid is not None:
        valid = partition(valid.roll((-sh, -sw), dims=(0, 1))[None, :, :, None], n, n)[0, :, :, 0]
    return valid, pair


@register_attention("window")
class WindowAttention(TokenMixer):
    """Each token attends to the tokens of its own window (windows of ceil(H/n_win) x ceil(W/n_win))."""

    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.dilated = False  # how tokens are grouped; DilatedAttention changes only this

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h, w = q.shape[1], q.shape[2]
        n, dilated = self.n_win, self.dilated
        wh, hp = grid_cells(h, n)
        ww, wp = grid_cells(w, n)
        key_ok = partition_valid(valid_map(h, w, hp, wp, q.device), n, n, dilated)
        out = grouped_attention(partition(pad_hw(q, hp, wp), n, n, dilated), partition(pad_hw(k, hp, wp), n, n, dilated),
                                partition(pad_hw(v, hp, wp), n, n, dilated), self.num_heads, self.scale, key_ok)
        return crop_hw(unpartition(out, n, n, hp, wp, dilated), h, w)


@register_attention("shifted_window")
class ShiftedWindowAttention(TokenMixer):
    """Windows displaced by half a window (Swin's alternate blocks).

    A cyclic roll plus a mask that keeps the wrapped-around pieces apart, as Swin does; alternate it
    with `window` in consecutive blocks. A single window (n_win=1) covers the whole map and, as in Swin
    where the window is as large as the map, is not shifted: shifting would cut the map into four.
    """

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h, w = q.shape[1], q.shape[2]
        n = self.n_win
        wh, hp = grid_cells(h, n)
        ww, wp = grid_cells(w, n)
        sh, sw = (wh // 2, ww // 2) if n > 1 else (0, 0)
        q, k, v = pad_hw(q, hp, wp).roll((-sh, -sw), dims=(1, 2)), pad_hw(k, hp, wp).roll((-sh, -sw), dims=(1, 2)), \
            pad_hw(v, hp, wp).roll((-sh, -sw), dims=(1, 2))
        key_ok, pair = shifted_window_masks(h, w, n, wh, ww, sh, sw, q.device)
        out = grouped_attention(partition(q, n, n), partition(k, n, n), partition(v, n, n), self.num_heads,
                                self.scale, key_ok, pair)
        return crop_hw(unpartition(out, n, n, hp, wp).roll((sh, sw), dims=(1, 2)), h, w)


for _leaf in ("pad_hw", "crop_hw", "valid_map", "partition_valid", "grouped_attention", "shifted_window_masks"):
    torch.fx.wrap(_leaf)
