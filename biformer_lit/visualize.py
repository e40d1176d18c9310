"""Pictures of where attention goes: BiFormer's routed regions, and every variant's key pattern.

Everything is read off the model during one ordinary forward: BRA layers store their routing when
`capture` is set (attention/bra.py), and a forward hook notes each layer's input (static patterns
depend only on the feature-map size). Token masks come from attention/reference.py, the oracle the
fast kernels are tested against, so a picture shows what the layer computed, not a re-derivation.
Figures are drawn on matplotlib's Agg canvas directly: no pyplot state, no display needed.

The command `python cli.py visualize` is biformer_lit/commands/visualize.py.
"""
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD

from .attention import reference as ref
from .attention.base import TokenMixer
# one colour per query region (red, blue, green, yellow, violet)
COLOURS = np.array([[1.0, 0.15, 0.1], [0.1, 0.45, 1.0], [0.1, 0.85, 0.2], [1.0, 0.85, 0.0], [0.8, 0.2, 1.0]])
STATIC_PATTERNS = {"window": ref.window_pattern, "shifted_window": ref.shifted_window_pattern,
                   "dilated": ref.dilated_pattern}


# --------------------------------------------------------------------------- capture

@dataclass
class LayerRecord:
    """What one attention layer did in one forward (batch of B images)."""
    stage: int
    block: int
    kind: str
    size: Tuple[int, int]                    # (h, w) of its feature map
    n_win: int
    topk: int
    num_heads: int
    stripe_width: Optional[int] = None
    index: Optional[torch.Tensor] = None     # bra: (B, R, topk) routed key regions, best first
    affinity: Optional[torch.Tensor] = None  # bra: (B, R, R) region affinities
    inputs: Optional[torch.Tensor] = None    # (B, h, w, C) the layer's input, when asked for

    @property
    def cell(self) -> Tuple[int, int]:
        h, w = self.size
        return math.ceil(h / self.n_win), math.ceil(w / self.n_win)

    @property
    def n_regions(self) -> int:
        return self.n_win ** 2


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a LightningModule (`.model`), or the model itself."""
    if not hasattr(model, "attention_modules") and isinstance(getattr(model, "model", None), nn.Module):
        return model.model
    return model


def attention_layers(model: nn.Module) -> Iterator[Tuple[int, int, TokenMixer]]:
    """(stage, block, module) of every attention layer; any TokenMixer network works (one 'stage')."""
    net = unwrap(model)
    if hasattr(net, "attention_modules"):
        yield from net.attention_modules()
    else:
        mixers = [m for m in net.modules() if isinstance(m, TokenMixer)]
        yield from ((0, j, m) for j, m in enumerate(mixers))


def select_layers(model: nn.Module, stages: Optional[Iterable[int]] = None,
                  all_blocks: bool = False) -> Set[Tuple[int, int]]:
    """(stage, block) pairs to draw: the last block of each chosen stage (default all stages)."""
    last: Dict[int, int] = {}
    chosen = set()
    for s, b, _ in attention_layers(model):
        if stages is None or s in set(stages):
            chosen.add((s, b))
            last[s] = max(b, last.get(s, -1))
    return chosen if all_blocks else {(s, b) for s, b in last.items()}


@contextlib.contextmanager
def capture_routing(model: nn.Module, layers: Optional[Set[Tuple[int, int]]] = None,
                    keep_inputs: bool = False):
    """Forwards inside the block fill the yielded {(stage, block): LayerRecord} (last forward wins).

    Turns `capture` on for the chosen layers and hooks them; on exit every flag, every `captured`
    and the hook list are exactly as before, so the model is left as it was found.
    """
    records: Dict[Tuple[int, int], LayerRecord] = {}
    entries = [(s, b, m) for s, b, m in attention_layers(model) if layers is None or (s, b) in layers]
    saved = [(m, m.capture, m.captured) for _, _, m in entries]
    handles = []

    def make_hook(stage, block):
        def hook(module, args, output):
            x = args[0]
            got = module.captured if module.kind == "bra" else None
            records[stage, block] = LayerRecord(
                stage, block, module.kind, tuple(x.shape[1:3]), module.n_win, module.topk, module.num_heads,
                module.stripe_width,
                index=None if got is None else got["index"].detach().cpu(),
                affinity=None if got is None else got["affinity"].detach().float().cpu(),
                inputs=x.detach() if keep_inputs else None)
        return hook

    try:
        for s, b, m in entries:
            m.capture = True  # only BRA acts on it; a static pattern needs nothing but the size
            handles.append(m.register_forward_hook(make_hook(s, b)))
        yield records
    finally:
        for h in handles:
            h.remove()
        for m, flag, captured in saved:
            m.capture, m.captured = flag, captured


def record_layers(model: nn.Module, images: torch.Tensor, layers: Optional[Set[Tuple[int, int]]] = None,
                  keep_inputs: bool = False) -> List[LayerRecord]:
    """One eval-mode, no-grad forward of (B, 3, H, W) images; a record per chosen layer, in order.

    Eval mode so BatchNorm running statistics are not touched; each module's own train flag is
    restored afterwards.
    """
    net = unwrap(model)
    modes = [(m, m.training) for m in net.modules()]
    param = next(net.parameters(), None)
    if param is not None:
        images = images.to(device=param.device, dtype=param.dtype)
    net.eval()
    try:
        with capture_routing(net, layers, keep_inputs) as records, torch.no_grad():
            net(images)
    finally:
        for m, flag in modes:
            m.training = flag
    return [records[k] for k in sorted(records)]


# --------------------------------------------------------------------------- masks (feature coords)

def region_map(rec: LayerRecord) -> torch.Tensor:
    """(h, w) region id of every token (row-major over the n_win x n_win grid)."""
    return ref.region_of(*rec.size, rec.n_win).reshape(rec.size)


def region_bounds(rec: LayerRecord, region: int) -> Tuple[int, int, int, int]:
    """Token rows [r0, r1) and columns [c0, c1) of a region's real (unpadded) tokens."""
    (h, w), (rh, rw) = rec.size, rec.cell
    i, j = divmod(region, rec.n_win)
    return i * rh, min((i + 1) * rh, h), j * rw, min((j + 1) * rw, w)


def region_centre(rec: LayerRecord, region: int) -> Tuple[int, int]:
    r0, r1, c0, c1 = region_bounds(rec, region)
    return (r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2


def nonempty_regions(rec: LayerRecord) -> List[int]:
    return sorted(set(region_map(rec).flatten().tolist()))


def default_query_regions(rec: LayerRecord) -> List[int]:
    """Three spread-out regions: top-right corner, centre, bottom-left corner (deduplicated)."""
    n = rec.n_win
    picks = [(0, n - 1), (n // 2, n // 2), (n - 1, 0)]
    real = set(nonempty_regions(rec))
    out = []
    for i, j in picks:
        r = i * n + j
        if r in real and r not in out:
            out.append(r)
    return out or nonempty_regions(rec)[:1]


def allowed_keys(rec: LayerRecord, query_token: Tuple[int, int], batch: int = 0,
                 per_head: bool = False) -> torch.Tensor:
    """Keys the query token may attend to, from the reference patterns: (h, w) bool.

    per_head=True gives (heads, h, w) for axial (rows / columns heads) and (1, h, w) otherwise.
    """
    (h, w), n = rec.size, rec.n_win
    q = query_token[0] * w + query_token[1]
    if rec.kind == "bra":
        row = ref.bra_pattern(rec.index[batch:batch + 1], h, w, n)[0, q][None]
    elif rec.kind == "axial":
        row = ref.axial_pattern(h, w, n, rec.num_heads, rec.stripe_width)[:, q]
    elif rec.kind == "full":
        row = ref.full_pattern(h, w)[q][None]
    elif rec.kind in STATIC_PATTERNS:
        row = STATIC_PATTERNS[rec.kind](h, w, n)[q][None]
    else:
        raise ValueError(f"no reference pattern for attention kind {rec.kind!r}")
    row = row.reshape(-1, h, w)
    return row if per_head else row.any(0)


def query_strength(rec: LayerRecord, region: int, batch: int = 0) -> torch.Tensor:
    """(h, w) overlay strength in [0, 1] for one query region.

    bra: the routed regions, strongest for the best-ranked (rank r of k -> 1 - 0.6 r / (k - 1)).
    static kinds: the keys of the region's centre token (their pattern has no routing to show).
    """
    if rec.kind != "bra":
        return allowed_keys(rec, region_centre(rec, region), batch).float()
    regions = region_map(rec)
    routed = rec.index[batch, region].tolist()
    strength = torch.zeros(rec.size)
    for rank, r in enumerate(routed):
        strength[regions == r] = 1.0 - 0.6 * rank / max(len(routed) - 1, 1)
    return strength


# --------------------------------------------------------------------------- pixels

def to_pixels(token_map: torch.Tensor, image_hw: Tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of an (h, w) token map to (H, W) image pixels (the map covers the image)."""
    tm = torch.as_tensor(token_map).cpu().numpy()
    (h, w), (hh, ww) = tm.shape, image_hw
    return tm[(np.arange(hh) * h) // hh][:, (np.arange(ww) * w) // ww]


def routing_overlay(rec: LayerRecord, query_regions: Sequence[int], image_hw: Tuple[int, int],
                    batch: int = 0) -> np.ndarray:
    """(Q, H, W) per-pixel highlight strength of each query region: exactly what gets blended."""
    return np.stack([to_pixels(query_strength(rec, r, batch), image_hw) for r in query_regions])


def blend(rgb: np.ndarray, strengths: np.ndarray, alpha: float = 0.6, colours: np.ndarray = COLOURS) -> np.ndarray:
    """Tint an (H, W, 3) [0, 1] image with each (H, W) strength map in its colour; zero leaves pixels as they are."""
    out = rgb.astype(np.float64).copy()
    for i, s in enumerate(strengths):
        a = alpha * np.asarray(s, dtype=np.float64)[..., None]
        out = out * (1 - a) + colours[i % len(colours)] * a
    return out


def to_display(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) float image in [0, 1]; mean/std None: already [0, 1]."""
    x = image.detach().float().cpu()
    if mean is not None:
        x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------- figures

def _grid_lines(rec: LayerRecord, axis: int) -> List[int]:
    """Token indices where cells start along one axis (excluding 0), for the kinds that have cells."""
    size, cell = rec.size[axis], rec.cell[axis]
    if rec.kind == "axial" and rec.stripe_width:  # stripes of a set width, not the region edge
        cell = min(rec.stripe_width, size)
    if rec.kind in ("bra", "window", "axial"):
        return list(range(cell, size, cell))
    if rec.kind == "shifted_window":  # windows displaced by half a window (reference pattern)
        return [t for t in range(1, size) if (t + cell - cell // 2) % cell == 0]
    return []  # full: one group; dilated: interleaved groups, no cells to draw


def _draw_grid(ax, rec: LayerRecord, image_hw) -> None:
    (h, w), (hh, ww) = rec.size, image_hw
    for t in _grid_lines(rec, 0):
        ax.axhline(t * hh / h - 0.5, color="white", lw=0.6, alpha=0.7)
    for t in _grid_lines(rec, 1):
        ax.axvline(t * ww / w - 0.5, color="white", lw=0.6, alpha=0.7)


def _pair(bounds):
    return bounds[:2], bounds[2:]


def _outline(ax, rec, rows, cols, image_hw, colour, lw=2.0, inset=0.0, ls="-"):
    """Box around token rows [r0, r1) x cols [c0, c1), in pixel coordinates, shrunk by `inset` pixels."""
    (h, w), (hh, ww) = rec.size, image_hw
    y0, y1, x0, x1 = rows[0] * hh / h, rows[1] * hh / h, cols[0] * ww / w, cols[1] * ww / w
    ax.add_patch(Rectangle((x0 - 0.5 + inset, y0 - 0.5 + inset), x1 - x0 - 2 * inset, y1 - y0 - 2 * inset,
                           fill=False, ec=colour, lw=lw, ls=ls))


def routing_figure(image: torch.Tensor, rec: LayerRecord, query_regions: Optional[Sequence[int]] = None,
                   query_token: Optional[Tuple[int, int]] = None, batch: int = 0,
                   heat: Optional[torch.Tensor] = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Figure:
    """Left: region grid, chosen query regions outlined, their routed regions (bra) or their centre
    token's keys (static kinds) tinted in the region's colour. Middle: the keys of one query token.
    Right (when `heat`, an (h, w) map from attention_heat, is given): its attention weights.
    `image` is the (3, H, W) model input; `batch` picks the image's routing within the record.
    """
    rgb = to_display(image, mean, std)
    hw = rgb.shape[:2]
    real = set(nonempty_regions(rec))
    regions = [r for r in (query_regions or []) if r in real] or default_query_regions(rec)
    h, w = rec.size
    qt = query_token if query_token is not None else (h // 2, w // 2)
    panels = 3 if heat is not None else 2
    fig = Figure(figsize=(3.3 * panels, 3.7), dpi=100)
    FigureCanvasAgg(fig)
    head = f"stage {rec.stage} block {rec.block}: {rec.kind}"

    ax = fig.add_subplot(1, panels, 1)
    ax.imshow(blend(rgb, routing_overlay(rec, regions, hw, batch)), interpolation="nearest")
    _draw_grid(ax, rec, hw)
    for i, r in enumerate(regions):
        r0, r1, c0, c1 = region_bounds(rec, r)
        colour = COLOURS[i % len(COLOURS)]
        if rec.kind == "bra":
            _outline(ax, rec, (r0, r1), (c0, c1), hw, colour, lw=2.5)
            # dashed boxes, inset per query, keep membership readable where tints of queries mix
            inset = (i + 0.5) * 0.1 * min(hw[0] * rec.cell[0] / h, hw[1] * rec.cell[1] / w)
            for k in rec.index[batch, r].tolist():
                _outline(ax, rec, *_pair(region_bounds(rec, k)), hw, colour, lw=1.0, inset=inset, ls="--")
        else:  # static: the query is the region's centre token
            cy, cx = region_centre(rec, r)
            _outline(ax, rec, (cy, cy + 1), (cx, cx + 1), hw, colour, lw=2.5)
    if rec.kind == "bra":
        ax.set_title(f"{head}\ntop-{rec.topk} of {rec.n_regions} regions (stronger tint = better rank)", fontsize=8)
    else:
        ax.set_title(f"{head}\nkeys of the boxed query tokens", fontsize=8)

    keys = allowed_keys(rec, qt, batch)
    ax = fig.add_subplot(1, panels, 2)
    ax.imshow(blend(rgb, to_pixels(keys.float(), hw)[None], colours=COLOURS[4:5]), interpolation="nearest")
    _draw_grid(ax, rec, hw)
    _outline(ax, rec, (qt[0], qt[0] + 1), (qt[1], qt[1] + 1), hw, "red", lw=2.5)
    ax.set_title(f"query token {tuple(qt)} of {h}x{w}:\nattends to {int(keys.sum())}/{h * w} keys", fontsize=8)

    if heat is not None:
        ax = fig.add_subplot(1, panels, 3)
        ax.imshow(rgb * 0.35, interpolation="nearest")
        hp = to_pixels(heat.float(), hw)
        ax.imshow(np.ma.masked_where(hp <= 0, hp), cmap="inferno", alpha=0.85, interpolation="nearest")
        _outline(ax, rec, (qt[0], qt[0] + 1), (qt[1], qt[1] + 1), hw, "cyan", lw=2.0)
        ax.set_title(f"attention weights of {tuple(qt)}\n(mean over {rec.num_heads} heads)", fontsize=8)
    for ax in fig.axes:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Rendered figure as an (H, W, 3) uint8 RGB array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# --------------------------------------------------------------------------- attention weights

def attention_weights(module: TokenMixer, rec: LayerRecord, query_token: Tuple[int, int],
                      batch: int = 0) -> torch.Tensor:
    """(heads, h, w) softmax weights of one query token, from the module's own qkv of its recorded
    input and the allowed mask (bra: the captured routing). Padding tokens are never keys."""
    if rec.inputs is None:
        raise ValueError("the record holds no layer input: record it with keep_inputs=True")
    (h, w), c, heads = rec.size, module.dim, module.num_heads
    x = rec.inputs[batch].reshape(h * w, c)
    with torch.no_grad():  # the module's own projection
        q, k, _ = module.project(x)
    d = c // heads
    q = q[query_token[0] * w + query_token[1]].float().reshape(heads, d)
    k = k.float().reshape(h * w, heads, d).transpose(0, 1)  # (heads, N, d)
    logits = torch.einsum("hd,hnd->hn", q * module.scale, k)
    allowed = allowed_keys(rec, query_token, batch, per_head=True).reshape(-1, h * w).to(logits.device)
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return weights.reshape(heads, h, w).cpu()


def attention_heat(model: nn.Module, image: torch.Tensor, stage: int, block: int,
                   query_token: Tuple[int, int], batch: int = 0) -> torch.Tensor:
    """(h, w) attention weights of one query token of layer (stage, block), averaged over heads.

    image: (3, H, W) or (B, 3, H, W) normalised input (batch picks the image)."""
    images = image[None] if image.dim() == 3 else image
    rec = record_layers(model, images, {(stage, block)}, keep_inputs=True)[0]
    module = {(s, b): m for s, b, m in attention_layers(model)}[stage, block]
    return attention_weights(module, rec, query_token, batch).mean(0)
