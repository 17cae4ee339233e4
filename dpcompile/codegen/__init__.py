"""Code the rewritten graph calls: the per-site custom ops (ops.py) and, on CUDA, their Triton kernels."""
