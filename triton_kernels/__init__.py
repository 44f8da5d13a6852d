"""Triton kernels of fusedclip, installed as ``fusedclip.triton_kernels``.

Import this package only through ``fusedclip.triton_kernels``: a top-level ``triton_kernels``
module name collides with one that Triton ships.
"""
