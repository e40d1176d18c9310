"""Lightning callbacks of biformer-lit."""
from .predictions import PredictionWriter
from .routing import RoutingVisualizer
from .run_stats import RunStats

__all__ = ["PredictionWriter", "RoutingVisualizer", "RunStats"]
