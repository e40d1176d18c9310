"""Lightning callbacks of biformer-lit."""
from .predictions import PredictionWriter
from .progress import EpochProgress
from .routing import RoutingVisualizer
from .run_stats import RunStats

__all__ = ["EpochProgress", "PredictionWriter", "RoutingVisualizer", "RunStats"]
