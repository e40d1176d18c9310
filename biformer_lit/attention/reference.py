"""Reference oracle: dense softmax attention with a boolean mask, and every variant's pattern written
independently and simply, from token coordinates. Slow (N x N) and obviously correct: the fast
variants are tested against it.

allowed[i, j] = True when query token i may attend to key token j; tokens are numbered row-major
over the real (unpadded) H x W map.
"""
import math

import torch
import torch.nn.functional as F


def coords(h: int, w: int):
    r = torch.arange(h).repeat_interleave(w)
    c = torch.arange(w).repeat(h)
    return r, c


def same(a: torch.Tensor) -> torch.Tensor:
    return a[:, None] == a[None, :]


def window_pattern(h, w, n_win):
    rh, rw = math.ceil(h / n_win), math.ceil(w / n_win)
    r, c = coords(h, w)
    return same(r // rh) & same(c // rw)


def shifted_window_pattern(h, w, n_win):
    # windows displaced by half a window; the edge pieces left over at top/left and bottom/right
    # (joined by Swin's cyclic roll) stay separate windows; one window over the whole map is not shifted
    if n_win == 1:
        return window_pattern(h, w, n_win)
    rh, rw = math.ceil(h / n_win), math.ceil(w / n_win)
    r, c = coords(h, w)
    return same((r + rh - rh // 2) // rh) & same((c + rw - rw // 2) // rw)


def dilated_pattern(h, w, n_win):
    r, c = coords(h, w)
    return same(r % n_win) & same(c % n_win)


def full_pattern(h, w):
    return torch.ones(h * w, h * w, dtype=torch.bool)


def stripe_pattern(h, w, width, axis):
    r, c = coords(h, w)
    return same((r if axis == 0 else c) // width)


def axial_pattern(h, w, n_win, num_heads, stripe_width=None):
    """Per-head (heads, N, N): the first heads // 2 heads in row stripes, the others in column stripes."""
    wr = min(stripe_width, h) if stripe_width else math.ceil(h / n_win)
    wc = min(stripe_width, w) if stripe_width else math.ceil(w / n_win)
    rows, cols = stripe_pattern(h, w, wr, 0), stripe_pattern(h, w, wc, 1)
    return torch.stack([rows] * (num_heads // 2) + [cols] * (num_heads - num_heads // 2))


def region_of(h, w, n_win):
    rh, rw = math.ceil(h / n_win), math.ceil(w / n_win)
    r, c = coords(h, w)
    return (r // rh) * n_win + c // rw


def bra_routing(q, k, h, w, n_win, topk):
    """q, k: (B, N, C). Mean of the real tokens of every region, affinity, topk -> (B, R, topk)."""
    region = region_of(h, w, n_win).to(q.device)
    n_regions = n_win * n_win
    onehot = F.one_hot(region, n_regions).to(q.dtype)  # (N, R)
    count = onehot.sum(0)
    qr = (onehot.T @ q) / count.clamp(min=1)[:, None]
    kr = (onehot.T @ k) / count.clamp(min=1)[:, None]
    affinity = qr @ kr.transpose(-1, -2)
    affinity = affinity.masked_fill(count[None, None, :] == 0, float("-inf"))
    return affinity.topk(topk, dim=-1).indices


def bra_pattern(index, h, w, n_win):
    """(B, N, N): a query sees a key when the key's region is among its region's routed regions."""
    region = region_of(h, w, n_win).to(index.device)
    routed = torch.zeros(index.shape[0], n_win * n_win, n_win * n_win, dtype=torch.bool, device=index.device)
    routed.scatter_(2, index, True)  # routed[b, query region, key region]
    return routed[:, region][:, :, region]


def dense_attention(q, k, v, allowed, num_heads, scale):
    """q, k, v: (B, N, C); allowed broadcastable to (B, heads, N, N). Plain softmax(qk^T) v."""
    b, n, c = q.shape
    q, k, v = (t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2) for t in (q, k, v))
    logits = (q * scale) @ k.transpose(-1, -2)
    logits = logits.masked_fill(~allowed, float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


def pattern_for(module, q, k, h, w, index=None):
    """The allowed mask of `module`'s variant, broadcastable to (B, heads, N, N). For 'bra', `index`
    (B, R, topk) replaces the oracle's own routing (to compare at a precision where ties may flip)."""
    kind = module.kind
    if kind == "bra":
        if index is None:
            index = bra_routing(q, k, h, w, module.n_win, module.topk)
        return bra_pattern(index, h, w, module.n_win)[:, None]
    if kind == "axial":
        return axial_pattern(h, w, module.n_win, module.num_heads, module.stripe_width)[None].to(q.device)
    if kind == "full":
        return full_pattern(h, w).to(q.device)
    return {"window": window_pattern, "shifted_window": shifted_window_pattern,
            "dilated": dilated_pattern}[kind](h, w, module.n_win).to(q.device)


def reference_forward(module, x, index=None):
    """The whole TokenMixer computed densely with `module`'s weights. x: (B, H, W, C) -> (B, H, W, C).
    index: optional routing for 'bra' (see pattern_for)."""
    b, h, w, c = x.shape
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias).reshape(b, h * w, 3 * c)
    q, k, v = qkv.chunk(3, dim=-1)
    allowed = pattern_for(module, q.detach(), k.detach(), h, w, index)
    out = dense_attention(q, k, v, allowed, module.num_heads, module.scale).reshape(b, h, w, c)
    if module.lepe is not None:
        src = v.reshape(b, h, w, c) if module.lepe_source == "v" else x
        out = out + F.conv2d(src.permute(0, 3, 1, 2), module.lepe.weight, module.lepe.bias,
                             padding=module.lepe.padding, groups=c).permute(0, 2, 3, 1)
    return F.linear(out, module.proj.weight, module.proj.bias)
