"""Load the original implementation's released checkpoints into this project's BiFormer.

Two released layouts exist (see ../shared/reference/README.md):
  legacy  biformer_tiny/small/base: `downsample_layers.*`, blocks at `stages.S.B.*`, Linear layers,
          routing layers' qkv at `attn.qkv.qkv`, output at `attn.wo`.
  nchw    biformer_stl_nchw: blocks at `stages.S.blocks.B.*`, 1x1 convs where we use Linear layers,
          routing layers' `qkv_linear` / `output_linear`.
Conversion renames keys and flattens 1x1 conv kernels to Linear weights; the numbers are unchanged.
"""
import re
from typing import Dict

import torch

# (pattern, replacement) applied in order, first match wins
LEGACY_RULES = [
    (r"^downsample_layers\.0\.0\.", "stem.conv1."),
    (r"^downsample_layers\.0\.1\.", "stem.norm1."),
    (r"^downsample_layers\.0\.3\.", "stem.conv2."),
    (r"^downsample_layers\.0\.4\.", "stem.norm2."),
    (r"^downsample_layers\.(\d)\.0\.", r"stages.\1.downsample.conv."),
    (r"^downsample_layers\.(\d)\.1\.", r"stages.\1.downsample.norm."),
    (r"^stages\.(\d+)\.(\d+)\.attn\.qkv\.qkv\.", r"stages.\1.blocks.\2.attn.qkv."),
    (r"^stages\.(\d+)\.(\d+)\.attn\.wo\.", r"stages.\1.blocks.\2.attn.proj."),
    (r"^stages\.(\d+)\.(\d+)\.mlp\.0\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.mlp\.3\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.(pos_embed|norm1|norm2|attn\.qkv|attn\.proj|attn\.lepe)\.",
     r"stages.\1.blocks.\2.\3."),
]
NCHW_RULES = [
    (r"^downsample_layers\.0\.0\.", "stem.conv."),
    (r"^downsample_layers\.0\.1\.", "stem.norm."),
    (r"^downsample_layers\.(\d)\.0\.", r"stages.\1.downsample.norm."),
    (r"^downsample_layers\.(\d)\.1\.", r"stages.\1.downsample.conv."),
    (r"^(stages\.\d+\.blocks\.\d+)\.attn\.qkv_linear\.", r"\1.attn.qkv."),
    (r"^(stages\.\d+\.blocks\.\d+)\.attn\.output_linear\.", r"\1.attn.proj."),
    (r"^(stages\.\d+\.blocks\.\d+)\.mlp\.0\.", r"\1.mlp.fc1."),
    (r"^(stages\.\d+\.blocks\.\d+)\.mlp\.2\.", r"\1.mlp.fc2."),
]
# in the nchw layout these are 1x1 convs: (out, in, 1, 1) -> Linear (out, in)
NCHW_POINTWISE = re.compile(r"\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight$")


def original_layout(keys) -> str:
    """'legacy', 'nchw' or '' (this project's own layout)."""
    keys = list(keys)
    if not any(k.startswith("downsample_layers.") for k in keys):
        return ""
    return "nchw" if any(re.match(r"^stages\.\d+\.blocks\.", k) for k in keys) else "legacy"


def convert_key(key: str, layout: str) -> str:
    for pattern, repl in LEGACY_RULES if layout == "legacy" else NCHW_RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def convert_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A released checkpoint's state dict in this project's names; own-layout dicts pass unchanged."""
    layout = original_layout(state_dict)
    if not layout:
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        new = convert_key(key, layout)
        if layout == "nchw" and NCHW_POINTWISE.search(new) and value.dim() == 4:
            value = value.flatten(1)
        out[new] = value
    return out


def checkpoint_filter_fn(state_dict: dict, model=None) -> dict:
    """timm's hook for pretrained weights: accepts a checkpoint dict or a bare state dict."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    return convert_state_dict(state_dict)


def convert_on_load(module, state_dict, prefix, *args, **kwargs):
    """load_state_dict pre-hook: rewrites original-layout keys under `prefix` in place."""
    own = {k[len(prefix):]: k for k in state_dict if k.startswith(prefix)}
    if not original_layout(own):
        return
    converted = convert_state_dict({k: state_dict[full] for k, full in own.items()})
    for full in own.values():
        del state_dict[full]
    state_dict.update({prefix + k: v for k, v in converted.items()})
