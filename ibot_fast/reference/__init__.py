"""The pure-PyTorch truth: readable code with the official iBOT semantics.

Used by the tests (every fast kernel is compared with its twin here) and by the
benchmarks (as the baseline that stands for the official code path). Nothing here is
tuned for speed.
"""
