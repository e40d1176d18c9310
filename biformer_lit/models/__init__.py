"""BiFormer models, registered with timm on import (and the CPU attention's FLOP formula with torch's counter)."""
from ..flops import register_flop_formulas
from .biformer import PRESETS, BiFormer, stage_sizes
from .convert import checkpoint_filter_fn, convert_state_dict

register_flop_formulas()

__all__ = ["BiFormer", "PRESETS", "stage_sizes", "checkpoint_filter_fn", "convert_state_dict"]
