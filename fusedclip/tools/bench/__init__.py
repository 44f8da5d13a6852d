"""The benchmark behind ``python -m fusedclip bench``: ``sets`` (named parameter sets),
``measure`` (workloads, timing, the memory floor) and ``report`` (table, JSON, plot)."""
