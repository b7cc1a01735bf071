"""Fixtures shared across test modules.  Session-scoped fixtures live here (imported
from their modules) so that every test module shares one instance: one SVM rig in a
box per test session (tests/rig_fixtures.py)."""

from rig_fixtures import rig_tier, svm_rig  # noqa: F401  (fixtures)
