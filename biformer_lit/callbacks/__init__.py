"""Lightning callbacks of biformer-lit."""
from .routing import RoutingVisualizer

__all__ = ["RoutingVisualizer"]
