"""Pure tensor math, apart from orchestration; tested on tiny tensors (tests/test_ops.py)."""
