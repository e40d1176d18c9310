"""Attention variants, one file each, all behind the TokenMixer interface and selectable by name."""
from .base import TokenMixer
from .registry import ATTENTIONS, create_attention, list_attentions, register_attention
from . import axial, bra, dilated, full, window  # noqa: F401  (registers the variants)

__all__ = ["TokenMixer", "ATTENTIONS", "create_attention", "list_attentions", "register_attention"]
