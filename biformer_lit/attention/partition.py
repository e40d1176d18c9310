"""Shared machinery of the partitioned attention patterns: padding to whole groups, group layouts, SDPA.

Tensors are channels-last (B, H, W, C). A pattern pads H, W up to whole groups; padded tokens never
serve as keys (they are masked), and their query outputs are cropped away.

Everything here is TorchScript-typed. The helpers that branch on sizes or on a mask being None are
FX leaves (`fx_leaf`): symbolic tracing records a call to them instead of tracing their Python control
flow, so traced models still pad, mask and route per input.
"""
from typing import List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F

from .precision import sdpa_policy


def fx_leaf(fn):
    """Register `fn` as a leaf of timm's FX feature extraction. torch.fx.wrap (symbolic_trace, torchvision)
    patches names in the globals of the module that calls it, so each module calling a leaf wraps that
    name itself, at its top level."""
    from timm.layers import _fx as timm_fx
    timm_fx.register_notrace_function(fn)
    return fn


def grid_cells(size: int, n: int) -> Tuple[int, int]:
    """Cell edge and padded size when `size` tokens are cut into `n` equal cells (last ones may be padding).
    Integer arithmetic only: it also runs on FX proxies."""
    cell = -(-size // n)
    return cell, cell * n


@fx_leaf
def pad_hw(x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map on the bottom/right to (B, hp, wp, C)."""
    h, w = x.shape[1], x.shape[2]
    if h == hp and w == wp:
        return x
    return F.pad(x, (0, 0, 0, wp - w, 0, hp - h))


@fx_leaf
def crop_hw(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Undo pad_hw. A no-op slice is skipped: its backward would still zero-fill a full-size gradient."""
    if x.shape[1] == h and x.shape[2] == w:
        return x
    return x[:, :h, :w]


@fx_leaf
def valid_map(h: int, w: int, hp: int, wp: int, device: torch.device) -> Optional[torch.Tensor]:
    """(hp, wp) bool map of real (not padded) tokens, or None when nothing is padded."""
    if h == hp and w == wp:
        return None
    valid = torch.zeros(hp, wp, dtype=torch.bool, device=device)
    valid[:h, :w] = True
    return valid


def partition(x: torch.Tensor, nh: int, nw: int, dilated: bool = False) -> torch.Tensor:
    """(B, H, W, C), H and W whole multiples of nh, nw -> (B, nh * nw, T, C): nh x nw groups of T tokens.
    Groups are blocks of neighbours (regions, windows) or, dilated, tokens nh / nw apart (a grid)."""
    b, h, w, c = x.shape
    if dilated:
        x = x.reshape(b, h // nh, nh, w // nw, nw, c).permute(0, 2, 4, 1, 3, 5)
    else:
        x = x.reshape(b, nh, h // nh, nw, w // nw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nh * nw, (h // nh) * (w // nw), c)


def unpartition(x: torch.Tensor, nh: int, nw: int, h: int, w: int, dilated: bool = False) -> torch.Tensor:
    """Inverse of partition: (B, nh * nw, T, C) -> (B, h, w, C) (h, w: the padded size)."""
    b, c = x.shape[0], x.shape[3]
    if dilated:
        x = x.reshape(b, nh, nw, h // nh, w // nw, c).permute(0, 3, 1, 4, 2, 5)
    else:
        x = x.reshape(b, nh, nw, h // nh, w // nw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


@fx_leaf
def partition_valid(valid: Optional[torch.Tensor], nh: int, nw: int, dilated: bool = False) -> Optional[torch.Tensor]:
    """The (H, W) real-token map laid out as partition lays out tokens: (nh * nw, T), or None."""
    if valid is None:
        return None
    return partition(valid[None, :, :, None], nh, nw, dilated)[0, :, :, 0]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(G, T, C) -> (G, heads, T, C/heads) as a strided view: SDPA reads it without a copy."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(G, heads, T, d) -> (G, T, heads*d)."""
    return x.transpose(1, 2).flatten(2)


@fx_leaf
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q, k, v: (G, heads, T, d) views; mask broadcastable to (G, heads, Tq, Tk), True = may attend.
    In the precision the per-device policy picks (precision.py: fp32 on CPU, autocast's on CUDA)."""
    return sdpa_policy(q, k, v, scale, mask)


@fx_leaf
def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float,
                      key_ok: Optional[torch.Tensor] = None,
                      pair_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention inside groups. q, k, v: (B, G, T, C) as partition makes them. `key_ok` (G, T) marks real
    tokens (padded keys are masked); `pair_mask` (G, T, T) adds a per-group query/key mask (shifted
    windows). Returns (B, G, T, C)."""
    b, g, t, c = q.shape
    mask: Optional[torch.Tensor] = None
    if key_ok is not None:
        mask = key_ok[:, None, None, :]
    if pair_mask is not None:
        pm = pair_mask[:, None]
        mask = pm if mask is None else (mask & pm)
    if mask is not None:  # groups are batch-major: (b g). No branch on b: an exported batch stays dynamic
        mask = mask[None].expand(b, -1, -1, -1, -1).flatten(0, 1)
    out = sdpa(split_heads(q.reshape(b * g, t, c), num_heads), split_heads(k.reshape(b * g, t, c), num_heads),
               split_heads(v.reshape(b * g, t, c), num_heads), scale, mask)
    return merge_heads(out).reshape(b, g, t, c)


def pad_all(tensors: List[torch.Tensor], hp: int, wp: int) -> List[torch.Tensor]:
    return [pad_hw(t, hp, wp) for t in tensors]


FX_LEAVES = ("pad_hw", "crop_hw", "valid_map", "partition_valid", "sdpa", "grouped_attention")
for _leaf in FX_LEAVES:
    torch.fx.wrap(_leaf)
