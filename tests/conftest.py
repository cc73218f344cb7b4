"""Shared pytest set-up. Test helpers live in tests/support/ (import them as tests.support.X).

Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (default "ci", so a plain `pytest` is exact too):
- ci: derandomized (the same examples on every run and every machine), no example database, so
  `make test` and CI give one verdict for one tree; a failure prints the blob that reproduces it.
- fuzz (`make fuzz`): random exploration, many more examples, and an example database kept under
  .hypothesis/examples so a failure found once is tried first on every later run.
A test's own @settings keeps these unless it names a setting itself; tests/unit/test_fuzz_http1.py
takes its example counts from the loaded profile.
"""

from __future__ import annotations

import os

from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    max_examples=100,
)
settings.register_profile(
    "fuzz",
    derandomize=False,
    database=DirectoryBasedExampleDatabase(".hypothesis/examples"),
    deadline=None,
    print_blob=True,
    max_examples=5000,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")
