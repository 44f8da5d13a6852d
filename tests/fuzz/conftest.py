"""The fuzzer's hypothesis profiles; ``FUSEDCLIP_FUZZ_PROFILE`` picks one (default ``ci``).

* ``ci``: what ``make test`` and CI run. Derandomized (the same examples every run, so a red CI
  is reproducible and a green one stays green), no example database written, no deadline (a call
  in Triton's interpreter takes seconds); about a minute on 2 busy cores for all of tests/fuzz.
* ``long``: ``make fuzz``. Random seeds, 20 times the examples, the failures kept in
  ``.hypothesis/`` (ignored by git) and replayed first next time.
* ``dev``: a quick random look (a fifth of ``ci``), for editing the fuzzer itself.

Each property asks for its examples as a share of the profile's ``max_examples`` (100 in ``ci``):
``strategies.examples``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from strategies import PROFILE_ENV

_COMMON = dict(
    deadline=None,
    print_blob=True,
    # The fixtures are the matrix's (backend, device) names, the same for every example.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

settings.register_profile("fusedclip-ci", max_examples=100, derandomize=True, database=None,
                          **_COMMON)
settings.register_profile("fusedclip-long", max_examples=2000, derandomize=False,
                          database=DirectoryBasedExampleDatabase(".hypothesis/fuzz"), **_COMMON)
settings.register_profile("fusedclip-dev", max_examples=20, derandomize=False, database=None,
                          **_COMMON)

if os.environ.get(PROFILE_ENV, "ci") not in ("ci", "long", "dev"):
    raise RuntimeError(f"{PROFILE_ENV} must be ci, long or dev, got {os.environ[PROFILE_ENV]!r}")
