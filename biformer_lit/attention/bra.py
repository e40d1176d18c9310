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
             mask: no per-query-region key/value copies at all. Needs region sizes FlexAttention can tile.
  'auto'     'flex' on CUDA where it applies, else 'indexed'.
"""
import torch
from einops import rearrange

from .base import TokenMixer
from .partition import grid_cells, merge_heads, pad_hw, sdpa, split_heads, valid_map
from .registry import register_attention
from .routing import region_means, route

REGIONS = "b (nh rh) (nw rw) c -> b (nh nw) (rh rw) c"
BACKENDS = ("auto", "indexed", "flex")


@register_attention("bra")
class BiLevelRoutingAttention(TokenMixer):
    def __init__(self, dim: int, num_heads: int, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        regions = self.n_win ** 2
        if not 1 <= self.topk <= regions:
            raise ValueError(f"topk={self.topk} is out of range: with n_win={self.n_win} there are "
                             f"{regions} regions, so topk must be in 1..{regions}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}; allowed: {', '.join(BACKENDS)}")

    def regions(self, h: int, w: int):
        rh, hp = grid_cells(h, self.n_win)
        rw, wp = grid_cells(w, self.n_win)
        return rh, rw, hp, wp

    def mix(self, qkv):
        b, h, w, c = qkv.shape
        c //= 3
        rh, rw, hp, wp = self.regions(h, w)
        sizes = dict(nh=self.n_win, nw=self.n_win, rh=rh, rw=rw)
        valid = valid_map(h, w, hp, wp, qkv.device)
        valid_r = None if valid is None else rearrange(valid[None, ..., None], REGIONS, **sizes)[0, ..., 0]  # (R, T)
        qkv = rearrange(pad_hw(qkv, hp, wp), REGIONS, **sizes)  # (B, R, T, 3C)
        q_r, nonempty = region_means(qkv[..., :c], valid_r)
        k_r, _ = region_means(qkv[..., c:2 * c], valid_r)
        affinity, index = route(q_r, k_r, self.topk, nonempty)
        if self.capture:
            self.captured = dict(kind=self.kind, index=index, affinity=affinity, n_win=self.n_win,
                                 size=(h, w), cell=(rh, rw))
        backend = self.pick_backend(qkv, rh * rw, valid_r)
        if backend == "flex":
            from .bra_flex import flex_routed_attention
            out = flex_routed_attention(qkv, index, self.num_heads, self.scale)
        else:
            out = indexed_routed_attention(qkv, index, self.num_heads, self.scale, valid_r)
        out = rearrange(out, "b (nh nw) (rh rw) c -> b (nh rh) (nw rw) c", **sizes)
        return out[:, :h, :w]

    def pick_backend(self, qkv, tokens_per_region: int, valid_r) -> str:
        if self.backend != "auto":
            return self.backend
        if qkv.is_cuda and valid_r is None:
            from .bra_flex import flex_supported
            if flex_supported(tokens_per_region):
                return "flex"
        return "indexed"


def indexed_routed_attention(qkv: torch.Tensor, index: torch.Tensor, num_heads: int, scale: float,
                             valid_r=None) -> torch.Tensor:
    """qkv: (B, R, T, 3C) regions; index: (B, R, k) routed key regions. Returns (B, R, T, C)."""
    b, r, t, c3 = qkv.shape
    c = c3 // 3
    topk = index.shape[-1]
    flat = (index + torch.arange(b, device=index.device)[:, None, None] * r).reshape(-1)
    # one copy of the routed keys/values; backward is index_add into (B*R, T, 2C)
    kv = qkv[..., c:].reshape(b * r, t, 2 * c).index_select(0, flat).reshape(b * r, topk * t, 2 * c)
    q = split_heads(qkv[..., :c].reshape(b * r, t, c), num_heads)
    k = split_heads(kv[..., :c], num_heads)
    v = split_heads(kv[..., c:], num_heads)
    mask = None
    if valid_r is not None:  # padded keys of the routed regions take no part
        mask = valid_r[index].reshape(b * r, 1, 1, topk * t)
    return merge_heads(sdpa(q, k, v, scale, mask)).reshape(b, r, t, c)
