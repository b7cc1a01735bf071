"""Fixtures shared across test modules.  Session-scoped fixtures live here (imported
from their modules) so that every test module shares one instance: one SVM rig in a
box per test session (tests/rig_fixtures.py)."""

# One network namespace + sshd lab per session too (tests/remote_fixtures.py): every
# instance takes the same veth addresses, so two at once would route to the wrong one.
from remote_fixtures import project_wheel, ssh_lab  # noqa: F401  (fixtures)
from rig_fixtures import rig_tier, svm_rig  # noqa: F401  (fixtures)
