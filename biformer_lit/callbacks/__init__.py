"""Lightning callbacks of biformer-lit."""
from .routing import RoutingVisualizer
from .run_stats import RunStats

__all__ = ["RoutingVisualizer", "RunStats"]
