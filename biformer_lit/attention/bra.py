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
import torch
from einops import rearrange

from .base import TokenMixer
from .partition import crop_hw, grid_cells, merge_heads, pad_all, sdpa, split_heads, valid_map
from .registry import register_attention
from .routing import region_means, route, routed_matrix

REGIONS = "b (nh rh) (nw rw) c -> b (nh nw) (rh rw) c"
BACKENDS = ("auto", "indexed", "masked", "flex", "gather")
MASKED_MAX_TOKENS_PER_REGION = 15  # measured crossover on CPU: 2x2 regions -> masked, 4x4 -> indexed
MASKED_MAX_MASK_ELEMENTS = 2 ** 26  # B * N^2 booleans (64 MB): beyond it the dense mask costs more than it saves


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

    def mix(self, q, k, v):
        b, h, w, c = q.shape
        rh, rw, hp, wp = self.regions(h, w)
        sizes = dict(nh=self.n_win, nw=self.n_win, rh=rh, rw=rw)
        valid = valid_map(h, w, hp, wp, q.device)
        valid_r = None if valid is None else rearrange(valid[None, ..., None], REGIONS, **sizes)[0, ..., 0]  # (R, T)
        q, k, v = (rearrange(t, REGIONS, **sizes) for t in pad_all((q, k, v), hp, wp))  # (B, R, T, C)
        q_r, nonempty = region_means(q.detach(), valid_r)
        k_r, _ = region_means(k.detach(), valid_r)
        affinity, index = route(q_r, k_r, self.topk, nonempty)
        if self.capture:
            self.captured = dict(kind=self.kind, index=index, affinity=affinity, n_win=self.n_win,
                                 size=(h, w), cell=(rh, rw))
        backend = self.pick_backend(q, rh * rw, valid_r)
        if backend == "flex":
            from .bra_flex import flex_routed_attention
            out = flex_routed_attention(q, k, v, index, self.num_heads, self.scale, valid_r)
        elif backend == "masked":
            out = masked_routed_attention(q, k, v, index, self.num_heads, self.scale, valid_r)
        elif backend == "gather":
            out = gathered_routed_attention(q, k, v, index, self.num_heads, self.scale, valid_r)
        else:
            out = indexed_routed_attention(q, k, v, index, self.num_heads, self.scale, valid_r)
        out = rearrange(out, "b (nh nw) (rh rw) c -> b (nh rh) (nw rw) c", **sizes)
        return crop_hw(out, h, w)

    def pick_backend(self, q, tokens_per_region: int, valid_r) -> str:
        if self.backend != "auto":
            return self.backend
        if q.is_cuda:
            from .bra_flex import flex_supported
            if flex_supported(tokens_per_region, self.topk):
                return "flex"
            return "indexed"  # H100: 'masked' was no faster in fp32 and 6x slower in bf16
        b, r = q.shape[:2]
        mask_elements = b * (r * tokens_per_region) ** 2
        if tokens_per_region <= MASKED_MAX_TOKENS_PER_REGION and mask_elements <= MASKED_MAX_MASK_ELEMENTS:
            return "masked"
        return "indexed"


def indexed_routed_attention(q, k, v, index: torch.Tensor, num_heads: int, scale: float,
                             valid_r=None) -> torch.Tensor:
    """q, k, v: (B, R, T, C) regions; index: (B, R, topk) routed key regions. Returns (B, R, T, C)."""
    b, r, t, c = q.shape
    topk = index.shape[-1]
    flat = (index + torch.arange(b, device=index.device)[:, None, None] * r).reshape(-1)
    # one copy of the routed keys/values; the backward is an index_add into (B*R, T*C). Rows of T*C:
    # on CPU index_select of 2-D rows is ~7x faster than of (T, C) slices (measured, torch 2.14)
    k, v = (x.reshape(b * r, t * c).index_select(0, flat).reshape(b * r, topk * t, c) for x in (k, v))
    mask = None
    if valid_r is not None:  # padded keys of the routed regions take no part
        mask = valid_r[index].reshape(b * r, 1, 1, topk * t)
    out = sdpa(split_heads(q.reshape(b * r, t, c), num_heads), split_heads(k, num_heads),
               split_heads(v, num_heads), scale, mask)
    return merge_heads(out).reshape(b, r, t, c)


def masked_routed_attention(q, k, v, index: torch.Tensor, num_heads: int, scale: float,
                            valid_r=None) -> torch.Tensor:
    """The same attention as `indexed_routed_attention`, computed densely: the (B, R, R) routing,
    expanded over tokens, masks an SDPA over all R*T tokens. No key/value copies."""
    b, r, t, c = q.shape
    routed = routed_matrix(index, r)
    key_ok = routed[..., None] if valid_r is None else routed[..., None] & valid_r  # (B, Rq, Rk, Tk or 1)
    mask = key_ok[:, :, None].expand(b, r, t, r, t).reshape(b, 1, r * t, r * t)
    out = sdpa(*(split_heads(x.reshape(b, r * t, c), num_heads) for x in (q, k, v)), scale, mask)
    return merge_heads(out).reshape(b, r, t, c)


def gathered_routed_attention(q, k, v, index: torch.Tensor, num_heads: int, scale: float,
                              valid_r=None) -> torch.Tensor:
    """The original's algorithm, kept as the benchmark baseline: every query region gathers its routed
    regions out of an expanded (B, R, R, T, 2C) view; the backward of that gather materialises and
    zero-fills a gradient of the expanded size."""
    b, r, t, c = q.shape
    topk = index.shape[-1]
    kv = torch.cat([k, v], dim=-1)
    kv = torch.gather(kv[:, None].expand(-1, r, -1, -1, -1), 2,
                      index[..., None, None].expand(-1, -1, -1, t, 2 * c))  # (B, R, k, T, 2C)
    k, v = kv.reshape(b, r, topk * t, 2 * c).chunk(2, dim=-1)
    q, k, v = (x.unflatten(-1, (num_heads, -1)).transpose(2, 3) for x in (q, k, v))  # (B, R, h, N, d)
    logits = (q * scale) @ k.transpose(-1, -2)
    if valid_r is not None:
        logits = logits.masked_fill(~valid_r[index].reshape(b, r, 1, 1, topk * t), float("-inf"))
    return (logits.softmax(-1) @ v).transpose(2, 3).flatten(3)
