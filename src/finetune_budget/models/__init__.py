"""Encoders built from names and numbers (never from pickled modules)."""
