"""Shared machinery of the partitioned attention patterns: padding to whole groups, group layouts, SDPA.

Tensors are channels-last (B, H, W, C). A pattern pads H, W up to whole groups; padded tokens never
serve as keys (they are masked), and their query outputs are cropped away.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange

from .precision import sdpa_policy

# an FX leaf: it branches on the device (its per-device policy), which symbolic tracing cannot follow
torch.fx.wrap("sdpa_policy")


def grid_cells(size: int, n: int) -> Tuple[int, int]:
    """Cell edge and padded size when `size` tokens are cut into `n` equal cells (last ones may be padding)."""
    cell = math.ceil(size / n)
    return cell, cell * n


def pad_hw(x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map on the bottom/right to (B, hp, wp, C)."""
    h, w = x.shape[1:3]
    if (h, w) == (hp, wp):
        return x
    return F.pad(x, (0, 0, 0, wp - w, 0, hp - h))


def crop_hw(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Undo pad_hw. A no-op slice is skipped: its backward would still zero-fill a full-size gradient."""
    return x if x.shape[1:3] == (h, w) else x[:, :h, :w]


def pad_all(tensors, hp: int, wp: int):
    return [pad_hw(t, hp, wp) for t in tensors]


def valid_map(h: int, w: int, hp: int, wp: int, device) -> Optional[torch.Tensor]:
    """(hp, wp) bool map of real (not padded) tokens, or None when nothing is padded."""
    if (h, w) == (hp, wp):
        return None
    valid = torch.zeros(hp, wp, dtype=torch.bool, device=device)
    valid[:h, :w] = True
    return valid


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(G, T, C) -> (G, heads, T, C/heads) as a strided view: SDPA reads it without a copy."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(G, heads, T, d) -> (G, T, heads*d)."""
    return x.transpose(1, 2).flatten(2)


def sdpa(q, k, v, scale: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q, k, v: (G, heads, T, d) views; mask broadcastable to (G, heads, Tq, Tk), True = may attend.
    In the precision the per-device policy picks (precision.py: fp32 on CPU, autocast's on CUDA)."""
    return sdpa_policy(q, k, v, scale, mask)


def grouped_attention(q, k, v, num_heads: int, scale: float, pattern: str, sizes: dict,
                      valid: Optional[torch.Tensor] = None, pair_mask: Optional[torch.Tensor] = None):
    """Attention inside the groups of an einops `pattern` mapping (b, H, W, c) -> (b g) t c.

    q, k, v: (b, H, W, C), already padded to whole groups. `valid` (H, W) marks real tokens
    (padded keys are masked); `pair_mask` (g, t, t) adds a per-group query/key mask (shifted
    windows). Returns (b, H, W, C).
    """
    b = q.shape[0]
    qg, kg, vg = (rearrange(t, pattern, **sizes) for t in (q, k, v))
    mask = None
    if valid is not None:
        key_ok = rearrange(valid[None, ..., None], pattern, **sizes)[..., 0]  # (g, t)
        mask = key_ok[:, None, None, :]
    if pair_mask is not None:
        pm = pair_mask[:, None]
        mask = pm if mask is None else (mask & pm)
    if mask is not None and mask.shape[0] != qg.shape[0]:
        mask = mask.repeat(b, 1, 1, 1)  # groups are batch-major: (b g)
    out = sdpa(split_heads(qg, num_heads), split_heads(kg, num_heads), split_heads(vg, num_heads), scale, mask)
    inverse = " -> ".join(reversed(pattern.split(" -> ")))
    return rearrange(merge_heads(out), inverse, b=b, **sizes)
