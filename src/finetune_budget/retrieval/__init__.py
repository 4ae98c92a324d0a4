"""What a retrieval model is trained on and measured by: losses, metrics, Matryoshka dims,
probes, and the optimiser with its checks."""
