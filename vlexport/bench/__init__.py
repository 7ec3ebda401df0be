"""`vlexport bench`: the bundle against PyTorch eager, in one run, at the same thread count."""
