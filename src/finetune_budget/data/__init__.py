"""Data sets, nested subsets and class-aware batching."""
