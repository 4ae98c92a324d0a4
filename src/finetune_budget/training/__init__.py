"""One run of the study: run.py (train(cfg)), tracker.py (the budget tracker, a Lightning
callback), continuation.py (a longer job continues a shorter one) and baseline_cache.py (epoch 0
evaluated once)."""
