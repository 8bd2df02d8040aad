"""robustprune: prune neural networks and measure what pruning does to their robustness."""

__version__ = "0.1.0"
