"""The Triton kernels of the ``triton`` backend: ``table`` (reading a plan's table), ``norm``
(pass 1), ``scale`` (pass 2 and value clipping), ``convert`` (fp32 to a gradient dtype).

Importing these modules imports Triton, which reads ``TRITON_INTERPRET`` then: the backend imports
them on first use.
"""
