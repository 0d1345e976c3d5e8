"""Triton kernels for effattn: fused forward, recompute backward (see forward.py,
backward.py); ops.py makes them the PyTorch ops effattn::triton_fwd/_bwd.

Importing this package imports Triton and compiles nothing; the backend in
effattn/backends/triton.py imports it on first use.
"""
