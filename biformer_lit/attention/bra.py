"""Bi-level routing attention (BiFormer, CVPR 2023).

1. The map is cut into n_win x n_win regions (padded to whole regions; padding never serves as a key
   nor enters a region summary).
2. Region summaries (mean query / key of each region) give a region-to-region affinity; each query
   region keeps its `topk` most related key regions (routing.py).
3. Every query token attends to all tokens of its region's routed regions.

Backends (`backend=`):
  'indexed'  index the routed regions' keys/values once (index_select: its backward is a scatter-add
             into the un-expanded tensor, not the original's expand+gather whose backward zero-fills a
             regions x regions x tokens x channels gradient), then fused SDPA. Runs anywhere.
  'flex'     CUDA FlexAttention over the token sequence in region order, with the routing as a block
             mask: no per-query-region key/value copies at all (regions padded to whole kernel tiles).
             CPU runs its eager reference path, forward only (FlexAttention has no CPU backward).
  'masked'   dense SDPA over the whole map with the routing expanded to a token mask: more pairs than
             'indexed', but one big batched kernel instead of thousands of tiny ones and no copies.
             Wins when regions are small (2x2 regions at stage 3 of BiFormer-T: a layer 1.7x faster on CPU).
  'gather'   the original implementation's algorithm (expand the key/value regions once per query
             region, torch.gather, explicit softmax attention): the baseline benchmarks compare against.
  'auto'     CUDA: 'flex' where 'indexed' would copy many routed tokens (top-k x region tokens
             >= 1024, e.g. large inputs with large top-k), else 'indexed'. CPU: 'masked' for regions
             under 16 tokens (while the token mask stays small), else 'indexed'.
"""
from typing import Optional

import torch
import torch.fx

from ..errors import UserError
from .base import TokenMixer
from .partition import (crop_hw, fx_leaf, grid_cells, merge_heads, pad_hw, partition, partition_valid, sdpa,
                        split_heads, unpartition, valid_map)
from .registry import register_attention
from .routing import region_means, route, routed_matrix

BACKENDS = ("auto", "indexed", "masked", "flex", "gather")
MASKED_MAX_TOKENS_PER_REGION = 15  # measured crossover on CPU: 2x2 regions -> masked, 4x4 -> indexed
MASKED_MAX_MASK_ELEMENTS = 2 ** 26  # B * N^2 booleans (64 MB): beyond it the dense mask costs more than it saves


@register_attention("bra")
class BiLevelRoutingAttention(TokenMixer):
    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        regions = self.n_win ** 2
        if not 1 <= self.topk <= regions:
            raise UserError(f"topk={self.topk} is out of range: with n_win={self.n_win} there are "
                            f"{regions} regions, so topk must be in 1..{regions}")
        if self.backend not in BACKENDS:
            raise UserError(f"backend={self.backend!r}; allowed: {', '.join(BACKENDS)}")

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h, w = q.shape[1], q.shape[2]
        n = self.n_win
        rh, hp = grid_cells(h, n)
        rw, wp = grid_cells(w, n)
        valid_r = partition_valid(valid_map(h, w, hp, wp, q.device), n, n)  # (R, T) or None
        q, k, v = partition(pad_hw(q, hp, wp), n, n), partition(pad_hw(k, hp, wp), n, n), \
            partition(pad_hw(v, hp, wp), n, n)  # (B, R, T, C)
        q_r, nonempty = region_means(q.detach(), valid_r)
        k_r, _ = region_means(k.detach(), valid_r)
        affinity, index = route(q_r, k_r, self.topk, nonempty)
        if self.capture:
            self.store_capture(index, affinity, h, w, rh, rw)
        out = routed_attention(q, k, v, index, self.num_heads, self.scale, valid_r, self.backend)
        return crop_hw(unpartition(out, n, n, hp, wp), h, w)

    @torch.jit.unused
    def store_capture(self, index: torch.Tensor, affinity: torch.Tensor, h: int, w: int, rh: int, rw: int):
        self.captured = dict(kind=self.kind, index=index, affinity=affinity, n_win=self.n_win,
                             size=(h, w), cell=(rh, rw))


def pick_backend(backend: str, q: torch.Tensor, tokens_per_region: int, topk: int,
                 max_tokens: int = MASKED_MAX_TOKENS_PER_REGION, max_mask: int = MASKED_MAX_MASK_ELEMENTS) -> str:
    """The backend that runs: `backend` unless 'auto' (see the module doc). q: (B, R, T, C).
    (The limits are arguments: TorchScript reads no global ints.)"""
    if backend != "auto":
        return backend
    if q.is_cuda:
        if flex_supported(tokens_per_region, topk):
            return "flex"
        return "indexed"  # H100: 'masked' was no faster in fp32 and 6x slower in bf16
    n = q.shape[1] * tokens_per_region
    if tokens_per_region <= max_tokens and q.shape[0] * n * n <= max_mask:
        return "masked"
    return "indexed"


@fx_leaf
def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, num_heads: int,
                     scale: float, valid_r: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """The token-level attention of the routed regions, by the backend `backend` picks.
    An FX leaf: the pick depends on the input's size and device."""
    picked = pick_backend(backend, q, q.shape[2], index.shape[-1])
    if picked == "flex" and not torch.jit.is_scripting():
        return flex_attention(q, k, v, index, num_heads, scale, valid_r)
    if picked == "masked":
        return masked_routed_attention(q, k, v, index, num_heads, scale, valid_r)
    if picked == "gather":
        return gathered_routed_attention(q, k, v, index, num_heads, scale, valid_r)
    return indexed_routed_attention(q, k, v, index, num_heads, scale, valid_r)


@torch.jit.unused
def flex_supported(tokens_per_region: int, topk: int) -> bool:
    from .bra_flex import flex_supported as supported
    return supported(tokens_per_region, topk)


@torch.jit.unused
def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, num_heads: int,
                   scale: float, valid_r: Optional[torch.Tensor]) -> torch.Tensor:
    # FlexAttention is not TorchScript; imported on first use (a CUDA-only path)
    from . import bra_flex
    return bra_flex.flex_routed_attention(q, k, v, index, num_heads, scale, valid_r)


def indexed_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                             num_heads: int, scale: float, valid_r: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q, k, v: (B, R, T, C) regions; index: (B, R, topk) routed key regions. Returns (B, R, T, C)."""
    b, r, t, c = q.shape
    topk = index.shape[-1]
    flat = (index + torch.arange(b, device=index.device)[:, None, None] * r).reshape(-1)
    # one copy of the routed keys/values; the backward is an index_add into (B*R, T*C). Rows of T*C:
    # on CPU index_select of 2-D rows is ~7x faster than of (T, C) slices (measured, torch 2.14)
    k = k.reshape(b * r, t * c).index_select(0, flat).reshape(b * r, topk * t, c)
    v = v.reshape(b * r, t * c).index_select(0, flat).reshape(b * r, topk * t, c)
    mask: Optional[torch.Tensor] = None
    if valid_r is not None:  # padded keys of the routed regions take no part
        mask = valid_r[index].reshape(b * r, 1, 1, topk * t)
    out = sdpa(split_heads(q.reshape(b * r, t, c), num_heads), split_heads(k, num_heads),
               split_heads(v, num_heads), scale, mask)
    return merge_heads(out).reshape(b, r, t, c)


def masked_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                            num_heads: int, scale: float, valid_r: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same attention as `indexed_routed_attention`, computed densely: the (B, R, R) routing,
    expanded over tokens, masks an SDPA over all R*T tokens. No key/value copies."""
    b, r, t, c = q.shape
    routed = routed_matrix(index, r)
    key_ok = routed[..., None]  # (B, Rq, Rk, Tk or 1)
    if valid_r is not None:
        key_ok = key_ok & valid_r
    mask = key_ok[:, :, None].expand(b, r, t, r, t).reshape(b, 1, r * t, r * t)
    out = sdpa(split_heads(q.reshape(b, r * t, c), num_heads), split_heads(k.reshape(b, r * t, c), num_heads),
               split_heads(v.reshape(b, r * t, c), num_heads), scale, mask)
    return merge_heads(out).reshape(b, r, t, c)


def gathered_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                              num_heads: int, scale: float, valid_r: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The original's algorithm, kept as the benchmark baseline: every query region gathers its routed
    regions out of an expanded (B, R, R, T, 2C) view; the backward of that gather materialises and
    zero-fills a gradient of the expanded size."""
    b, r, t, c = q.shape
    topk = index.shape[-1]
    kv = torch.cat([k, v], dim=-1)
    kv = torch.gather(kv[:, None].expand(-1, r, -1, -1, -1), 2,
                      index[..., None, None].expand(-1, -1, -1, t, 2 * c))  # (B, R, k, T, 2C)
    k, v = kv.reshape(b, r, topk * t, 2 * c).chunk(2, dim=-1)
    q, k, v = (q.unflatten(-1, (num_heads, -1)).transpose(2, 3), k.unflatten(-1, (num_heads, -1)).transpose(2, 3),
               v.unflatten(-1, (num_heads, -1)).transpose(2, 3))  # (B, R, h, N, d)
    logits = (q * scale) @ k.transpose(-1, -2)
    if valid_r is not None:
        logits = logits.masked_fill(~valid_r[index].reshape(b, r, 1, 1, topk * t), float("-inf"))
    return (logits.softmax(-1) @ v).transpose(2, 3).flatten(3)


for _leaf in ("pad_hw", "crop_hw", "valid_map", "partition_valid", "region_means", "route", "routed_attention"):
    torch.fx.wrap(_leaf)
