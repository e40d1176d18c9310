"""BiFormer: stages of (pos-embed) -> attention -> MLP blocks, over a four-stage pyramid.

One model class covers the paper's models (biformer_tiny/small/base: overlapping conv stem, a 3x3
depthwise positional conv in every block; biformer_stl: Swin-T layout with a patchify stem) and every
controlled ablation: the attention kind, top-k, region grid, heads, ... are per-stage knobs, and all
attention variants share one parameter layout (see biformer_lit.attention.base).

Layout: images are NCHW between stages (timm's features convention); blocks run channels-last.
"""
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from ..attention import create_attention
from ..attention.base import is_int
from ..attention.precision import depthwise_conv
from ..attention.bra import BACKENDS as BRA_BACKENDS
from ..attention.partition import fx_leaf
from ..attention.registry import check_attention_name
from ..errors import UserError
from .convert import checkpoint_filter_fn, convert_on_load

STEMS = ("overlap", "patch")


def check_head(num_classes, global_pool: str) -> None:
    if not is_int(num_classes) or num_classes < 0:
        raise UserError(f"num_classes={num_classes!r}; allowed: an integer >= 0 (0 = no classifier)")
    if global_pool not in ("avg", ""):
        raise UserError(f"global_pool={global_pool!r}; allowed: 'avg' or '' (no pooling)")
    if global_pool == "" and num_classes > 0:  # a Linear cannot classify an unpooled map
        raise UserError(f"global_pool='' (unpooled features) needs num_classes=0, got num_classes={num_classes}")


def per_stage(value, name: str, n: int = 4) -> list:
    """Broadcast a scalar knob to every stage; check a list has one entry per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"{name} has {len(value)} entries {list(value)}; expected {n} (one per stage)")
        return list(value)
    return [value] * n


def stage_sizes(img_size: Tuple[int, int], stem: str) -> List[Tuple[int, int]]:
    """Feature-map size of each stage for an input of img_size (matches the convs below)."""
    h, w = img_size
    if stem == "overlap":  # two 3x3 stride-2 pad-1 convs, then 3x3 stride-2 pad-1 downsamples
        halve = lambda s: (s + 1) // 2
        h, w = halve(halve(h)), halve(halve(w))
        sizes = [(h, w)]
        for _ in range(3):
            h, w = halve(h), halve(w)
            sizes.append((h, w))
    else:  # 4x4 stride-4 patchify, then 2x2 stride-2 downsamples
        h, w = h // 4, w // 4
        sizes = [(h, w)]
        for _ in range(3):
            h, w = h // 2, w // 2
            sizes.append((h, w))
    return sizes


def min_img_size(stem: str) -> int:
    """The smallest side that leaves every stage at least one token (1 for the padded overlap stem)."""
    return next(n for n in range(1, 1024) if min(min(hw) for hw in stage_sizes((n, n), stem)) >= 1)


@fx_leaf
def check_min_side(x: torch.Tensor, min_size: int) -> torch.Tensor:
    """x itself, if both its sides have at least min_size px. An FX leaf, and it returns x so that a
    traced graph keeps it (a check whose result is unused would be dead code)."""
    if x.shape[-2] < min_size or x.shape[-1] < min_size:
        # unpadded 4x4/4 then 2x2/2 convs: else a conv error deep inside
        raise UserError(f"input of {x.shape[-2]}x{x.shape[-1]} px; the patch stem needs at least "
                        f"{min_size} px per side (four stages)")
    return x


torch.fx.wrap("check_min_side")


def block_kind(stage_kind: str, j: int) -> str:
    """A 'shifted_window' stage alternates plain and shifted windows, block by block, as Swin does."""
    return "window" if stage_kind == "shifted_window" and j % 2 == 0 else stage_kind


class Block(nn.Module):
    """x += pos(x) [optional]; x += attn(norm(x)); x += mlp(norm(x)). Channels-last in and out."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float, pos_embed: bool):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if pos_embed else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            # fp32 under bf16 autocast: the precision policy (attention/precision.py)
            x = x + depthwise_conv(x.permute(0, 3, 1, 2), self.pos_embed.weight,
                                   self.pos_embed.bias).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Downsample(nn.Module):
    """Halve the resolution between stages: 3x3/2 conv + BN (overlap stem) or BN + 2x2/2 conv (patch stem)."""

    def __init__(self, cin: int, cout: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "overlap":
            self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            self.norm = nn.BatchNorm2d(cout)
        else:
            self.norm = nn.BatchNorm2d(cin)
            self.conv = nn.Conv2d(cin, cout, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)) if self.kind == "overlap" else self.conv(self.norm(x))


class OverlapStem(nn.Module):
    """conv3x3/2 -> BN -> GELU -> conv3x3/2 -> BN (BiFormer-T/S/B)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class PatchStem(nn.Module):
    """conv4x4/4 -> BN (STL)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, 4, stride=4)
        self.norm = nn.BatchNorm2d(dim)
        self.min_size = min_img_size("patch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(check_min_side(x, self.min_size)))


class Stage(nn.Module):
    """Optional downsample, then blocks. NCHW in and out."""

    def __init__(self, downsample: Optional[nn.Module], blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class BiFormer(nn.Module):
    """Four-stage BiFormer family model. Per-stage knobs take a scalar (all stages) or a 4-list.

    Args:
        depths, embed_dims: blocks and width per stage.
        attn: attention kind per stage (see biformer_lit.attention.list_attentions()); a
            'shifted_window' stage alternates window / shifted_window blocks (Swin).
        topks: routed regions per query region (bra stages).
        n_wins: regions / windows per side.
        head_dim: width per head; num_heads (per stage, None = dim // head_dim) overrides it.
        mlp_ratios, qkv_bias, lepe_kernel, lepe_source, scale_mode, stripe_widths, attn_backend: see
            biformer_lit.attention.base.TokenMixer.
        stem: 'overlap' (BiFormer-T/S/B) or 'patch' (Swin-T layout, STL).
        pos_embed: the 3x3 depthwise conv at the start of every block (BiFormer-T/S/B).
        img_size: the size the model is built for; feature maps smaller than the region grid at this
            size are rejected at construction. Other sizes run too (padded, see the attention).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: Union[int, Sequence[int]] = 224,
                 depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), attn="bra", topks=(1, 4, 16, 16),
                 n_wins=7, head_dim: int = 32, num_heads=None, mlp_ratios=3.0, qkv_bias=True,
                 lepe_kernel=5, lepe_source="v", scale_mode="head", stripe_widths=None,
                 attn_backend: str = "auto", stem: str = "overlap", pos_embed: bool = True,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        if stem not in STEMS:
            raise UserError(f"stem={stem!r}; allowed: {', '.join(STEMS)}")
        check_head(num_classes, global_pool)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(self.img_size) != 2 or not all(is_int(v) and v >= 1 for v in self.img_size) \
                or min(self.img_size) < min_img_size(stem):  # each side's stages depend on that side alone
            raise UserError(f"img_size={img_size!r}; allowed: a size, or (height, width), of at least "
                             f"{min_img_size(stem)} px "
                             f"(four stages after the {stem} stem)")
        if attn_backend not in BRA_BACKENDS:
            raise UserError(f"attn_backend={attn_backend!r}; allowed: {', '.join(BRA_BACKENDS)}")
        if not isinstance(pos_embed, bool):
            raise UserError(f"pos_embed={pos_embed!r}; allowed: true or false")
        depths, dims = per_stage(depths, "depths"), per_stage(embed_dims, "embed_dims")
        attn, topks, n_wins = per_stage(attn, "attn"), per_stage(topks, "topks"), per_stage(n_wins, "n_wins")
        num_heads, mlp_ratios = per_stage(num_heads, "num_heads"), per_stage(mlp_ratios, "mlp_ratios")
        qkv_bias, lepe_kernel = per_stage(qkv_bias, "qkv_bias"), per_stage(lepe_kernel, "lepe_kernel")
        lepe_source, scale_mode = per_stage(lepe_source, "lepe_source"), per_stage(scale_mode, "scale_mode")
        stripe_widths = per_stage(stripe_widths, "stripe_widths")
        for name, values, lo in (("depths", depths, 0), ("embed_dims", dims, 1)):
            if not all(is_int(v) and v >= lo for v in values):
                raise UserError(f"{name}={values}; allowed: integers >= {lo}")
        if not all(v is None or (is_int(v) and v >= 1) for v in num_heads):
            raise UserError(f"num_heads={num_heads}; allowed: integers >= 1, or null (width / head_dim)")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in mlp_ratios):
            raise UserError(f"mlp_ratios={mlp_ratios}; allowed: numbers > 0")
        if not all(isinstance(v, bool) for v in qkv_bias):
            raise UserError(f"qkv_bias={qkv_bias}; allowed: true or false (per stage)")
        if not 0.0 <= drop_path_rate < 1.0 or not 0.0 <= drop_rate < 1.0:
            raise UserError(f"drop_path_rate={drop_path_rate}, drop_rate={drop_rate}; allowed: [0, 1)")
        for name in attn:
            check_attention_name(name)
        sizes = stage_sizes(self.img_size, stem)
        for i, (h, w) in enumerate(sizes):
            if attn[i] != "full" and n_wins[i] > min(h, w):
                raise UserError(f"n_wins[{i}]={n_wins[i]} is larger than stage {i}'s feature map {h}x{w} "
                                 f"at img_size={self.img_size}; use n_win <= {min(h, w)} or a larger image")
        heads = []
        for i, d in enumerate(dims):
            if num_heads[i] is None and (head_dim < 1 or d % head_dim):
                raise UserError(f"stage {i}: width {d} is not divisible by head_dim={head_dim}")
            nh = num_heads[i] or d // head_dim
            if nh < 1 or d % nh:
                raise UserError(f"stage {i}: width {d} is not divisible by num_heads={nh}")
            heads.append(nh)

        self.num_classes, self.drop_rate, self.global_pool = num_classes, drop_rate, global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.stage_cfg = dict(depths=depths, embed_dims=dims, attn=attn, topks=topks, n_wins=n_wins,
                              num_heads=heads, mlp_ratios=mlp_ratios, stem=stem)
        # two classes, not one with both layouts: TorchScript compiles every branch of a forward
        self.stem = OverlapStem(in_chans, dims[0]) if stem == "overlap" else PatchStem(in_chans, dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, self.feature_info, reduction = [], [], 4
        for i in range(4):
            make_attn = partial(create_attention, dim=dims[i], num_heads=heads[i], n_win=n_wins[i], topk=topks[i],
                                stripe_width=stripe_widths[i], qkv_bias=qkv_bias[i], lepe_kernel=lepe_kernel[i],
                                lepe_source=lepe_source[i], scale_mode=scale_mode[i], backend=attn_backend)
            try:
                blocks = [Block(dims[i], make_attn(block_kind(attn[i], j)), mlp_ratios[i], dpr[sum(depths[:i]) + j],
                                pos_embed) for j in range(depths[i])]
            except UserError as e:  # the layer's own message, and which stage's settings it is about
                raise UserError(f"stage {i}: {e}") from None
            down = Downsample(dims[i - 1], dims[i], stem) if i else None
            stages.append(Stage(down, blocks))
            reduction = reduction * 2 if i else reduction
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        # released checkpoints of the original implementation load as they are (key names converted)
        self.register_load_state_dict_pre_hook(convert_on_load)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- timm conventions -------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return set()  # norms and biases are excluded by the optimizer factory (1-D parameters)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else
                    [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                     (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        check_head(num_classes, self.global_pool if global_pool is None else global_pool)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def attention_modules(self):
        """(stage, block, module) for every attention layer: what visualisation and capture hooks use."""
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage.blocks):
                yield i, j, block.attn

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's convention: the NCHW outputs of the stages in `indices` (an int n = the last n stages,
        or a list of stage numbers, negative from the end; default all), and unless intermediates_only
        the final features. norm: apply the final norm to a last-stage intermediate."""
        if output_fmt != "NCHW":
            raise UserError(f"output_fmt={output_fmt!r}; allowed: 'NCHW'")
        take, last = feature_take_indices(len(self.stages), indices)
        intermediates, x = [], self.stem(x)
        stages = self.stages[:last + 1] if stop_early or intermediates_only else self.stages
        last_stage = len(self.stages) - 1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == last_stage else x)
        if intermediates_only:
            return intermediates
        # the final norm is sized for the last stage: stopped early, the features are that stage's map
        return (self.norm(x) if i == last_stage else x), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """Drop the stages after the last of `indices` (and the norm / head): timm's feature extraction."""
        take, last = feature_take_indices(len(self.stages), indices)
        prune_end = last < len(self.stages) - 1
        if prune_norm or prune_end:  # the final norm is sized for (and only applied to) the last stage
            self.norm = nn.Identity()
        self.stages = self.stages[:last + 1]
        if prune_end:  # the features now end at the last kept stage; a head sized for the old ones goes too
            self.num_features = self.head_hidden_size = self.feature_info[last]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- presets --------------------------------------------------------------------------------------
def _cfg(stem: str = "overlap", img_size=224) -> dict:
    """timm's pretrained_cfg for a model built with this stem and input size. input_size keeps 3 channels:
    it describes the weights (RGB); timm adapts first_conv to another in_chans when loading them."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    # the final map's size: the overlap stem pads (sizes round up), so it is not h // 32 there
    return dict(url="", num_classes=1000, input_size=(3, h, w), pool_size=stage_sizes((h, w), stem)[-1],
                crop_pct=0.9, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="stem.conv1" if stem == "overlap" else "stem.conv", classifier="head", license="mit")


def _create(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    # the registered cfg, updated for what this model is built with (a user's img_size or stem)
    img = kwargs.get("img_size", 224)
    img = img if isinstance(img, int) or (isinstance(img, (tuple, list)) and len(img) == 2) else 224  # BiFormer
    built = _cfg(kwargs.get("stem", "overlap"), img)  # reports a bad size itself
    overlay = {k: built[k] for k in ("input_size", "pool_size", "first_conv")}
    overlay.update(kwargs.pop("pretrained_cfg_overlay", None) or {})
    return build_model_with_cfg(BiFormer, variant, pretrained, pretrained_cfg_overlay=overlay,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **kwargs)


# The released models. Their numerical quirks are the original's, kept so the released checkpoints
# reproduce: routing layers scale logits by dim ** -0.5 (full width, not head width), and the last
# stage is global attention with 8 heads, no qkv bias (legacy: LePE on the attention *input*).
LEGACY = dict(head_dim=32, n_wins=7, topks=(1, 4, 16, 16), attn=("bra", "bra", "bra", "full"),
              num_heads=(None, None, None, 8), qkv_bias=(True, True, True, False),
              lepe_source=("v", "v", "v", "input"), scale_mode=("dim", "dim", "dim", "head"),
              lepe_kernel=5, stem="overlap", pos_embed=True)
STL = dict(depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), mlp_ratios=4, head_dim=32, n_wins=7,
           topks=(1, 4, 16, 16), attn=("bra", "bra", "bra", "full"), num_heads=(None, None, None, 8),
           qkv_bias=(True, True, True, False), lepe_source="v", scale_mode=("dim", "dim", "dim", "head"),
           lepe_kernel=5, stem="patch", pos_embed=False)

PRESETS = {
    "biformer_tiny": dict(LEGACY, depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), mlp_ratios=3),
    "biformer_small": dict(LEGACY, depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), mlp_ratios=3),
    "biformer_base": dict(LEGACY, depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768), mlp_ratios=3),
    "biformer_stl": STL,
    # Small models for CPU experiments (64x64 inputs: stage maps 16, 8, 4, 2): the STL layout,
    # standard head scaling, regions per side scaled to the maps.
    "biformer_cpu_tiny": dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), mlp_ratios=3, head_dim=16,
                              n_wins=(4, 4, 2, 1), topks=(4, 4, 2, 1), attn=("bra", "bra", "bra", "full"),
                              stem="patch", pos_embed=False, img_size=64),
    # The STL layout at half the paper's resolution (112x112: maps 28, 14, 7, 3) with the paper's region
    # grid (n_win 7, top-k 1-4-16), so ablation arms written for it carry over to 224x224 unchanged.
    "biformer_cpu_stl": dict(STL, depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), head_dim=16,
                             num_heads=(None, None, None, 8), mlp_ratios=3, scale_mode="head", img_size=112),
    "biformer_cpu_small": dict(depths=(2, 2, 4, 2), embed_dims=(48, 96, 192, 384), mlp_ratios=3, head_dim=16,
                               n_wins=(4, 4, 2, 1), topks=(4, 4, 2, 1), attn=("bra", "bra", "bra", "full"),
                               stem="patch", pos_embed=False, img_size=64),
}


default_cfgs = generate_default_cfgs({name: _cfg(p.get("stem", "overlap"), p.get("img_size", 224))
                                     for name, p in PRESETS.items()})  # read by register_model below


def _entry(name: str):
    def fn(pretrained: bool = False, **kwargs) -> BiFormer:
        return _create(name, pretrained, **dict(PRESETS[name], **kwargs))

    fn.__name__ = name
    fn.__doc__ = f"{name}: {PRESETS[name]}"
    return fn


for _name in PRESETS:
    globals()[_name] = register_model(_entry(_name))
