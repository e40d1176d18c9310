"""BiFormer models, registered with timm on import."""
from .biformer import PRESETS, BiFormer, stage_sizes
from .convert import checkpoint_filter_fn, convert_state_dict

__all__ = ["BiFormer", "PRESETS", "stage_sizes", "checkpoint_filter_fn", "convert_state_dict"]
