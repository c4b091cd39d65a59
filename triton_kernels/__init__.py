"""Triton kernels, installed as ``fastmerge.triton_kernels`` (the top-level name is taken on PyPI).

The GPU kernels land with the GPU issue; ``fastmerge.backends()`` reports them unavailable until then.
"""
