"""The Triton kernels of the ``triton`` backend, one family per module: ``norm`` (pass 1: one read
of the gradients, a partial per chunk), ``finish`` (the partials combined into the norm and the
coefficient), ``scale`` (the in-place passes: pass 2 and value clipping); helpers: ``pair`` (the
partial's arithmetic), ``table`` (reading a plan's table), ``convert`` (fp32 to a gradient dtype).

Importing these modules imports Triton, which reads ``TRITON_INTERPRET`` then: the backend imports
them on first use.
"""
