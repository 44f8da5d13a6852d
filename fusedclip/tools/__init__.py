"""Tooling around the library: the command line (``cli``), the self-check (``selfcheck``) and the
benchmark (``bench``). Nothing in the library imports from here."""
