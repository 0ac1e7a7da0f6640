"""The oracle: the dense model run under masked-dense semantics by hooks, and ``verify`` against it."""
