"""The pytest plugin's markers and backend selection, run in a fresh pytest on a probe module.

Each case runs pytest in a subprocess with ``KVMHARNESS_KVM_DEVICE`` pointing at a path
that does not exist, so the outcome does not depend on this host's /dev/kvm: the kvm
backend is unusable and every host verdict says why.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

PROBE = '''
import pytest


@pytest.mark.requires_svm
def test_host_feature(backend):
    assert backend in ("kvm", "sim")


@pytest.mark.requires_kvm(all_backends=True)
def test_needs_the_host_on_every_backend(backend):
    pass


@pytest.mark.requires_sim
def test_drives_the_simulator():
    from kvmharness.sim.system import SimSystem

    with SimSystem() as system:
        assert system.name == "sim"


@pytest.mark.requires_svm
def test_needs_the_host_without_a_backend_parameter():
    pass
'''

USES_SIM = '''
from kvmharness.sim.system import SimSystem


def test_simulator_module():
    assert SimSystem
'''


def _pytest(tmp_path, *args, pythonpath=None):
    env = {"KVMHARNESS_KVM_DEVICE": str(tmp_path / "no-such-kvm"), "PATH": "/usr/bin:/bin"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    junit = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
                           f"--junitxml={junit}", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    outcomes = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            skipped = case.find("skipped")
            failed = case.find("failure") is not None or case.find("error") is not None
            outcomes[case.get("name")] = ("failed" if failed else
                                          f"skipped: {skipped.get('message')}" if skipped is not None
                                          else "passed")
    return proc, outcomes


def _probe(tmp_path):
    (tmp_path / "test_probe.py").write_text(PROBE)


def test_a_host_marker_skips_only_the_kvm_parameter(tmp_path):
    _probe(tmp_path)
    proc, out = _pytest(tmp_path, "--backend", "all")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    # no usable /dev/kvm: "all" is the simulator alone, and the SVM requirement is the host's
    assert out["test_host_feature[sim]"] == "passed"
    assert out["test_drives_the_simulator"] == "passed"
    assert out["test_needs_the_host_on_every_backend[sim]"].startswith("skipped: requires_kvm: ")
    assert out["test_needs_the_host_without_a_backend_parameter"].startswith("skipped: requires_svm: ")
    assert "no-such-kvm" in out["test_needs_the_host_on_every_backend[sim]"]  # the probed reason


def test_the_kvm_parameter_carries_the_host_requirement(tmp_path):
    _probe(tmp_path)
    proc, out = _pytest(tmp_path, "--backend", "kvm")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert out["test_host_feature[kvm]"].startswith("skipped: requires_svm: ")
    assert out["test_needs_the_host_on_every_backend[kvm]"].startswith("skipped: requires_kvm: ")
    assert out["test_drives_the_simulator"] == ("skipped: requires_sim: the sim backend is not "
                                                "selected here (--backend kvm)")


def _broken_unicorn(tmp_path):
    fake = tmp_path / "fake-site"
    (fake / "unicorn").mkdir(parents=True)
    (fake / "unicorn" / "__init__.py").write_text('raise ImportError("this unicorn is broken (test)")\n')
    return fake


def test_a_missing_simulator_is_an_error_not_skips(tmp_path):
    _probe(tmp_path)
    proc, out = _pytest(tmp_path, "--backend", "all", pythonpath=_broken_unicorn(tmp_path))
    assert proc.returncode == 4  # pytest's usage error: nothing ran
    assert out == {}
    message = [line for line in proc.stderr.splitlines() if "kvmharness:" in line]
    assert len(message) == 1
    assert "the sim backend is selected (--backend all)" in message[0]
    assert "this unicorn is broken (test)" in message[0] and "--backend kvm" in message[0]


def test_without_the_simulator_the_kvm_backend_leaves_its_modules_uncollected(tmp_path):
    _probe(tmp_path)
    (tmp_path / "test_uses_sim.py").write_text(USES_SIM)
    proc, out = _pytest(tmp_path, "--backend", "kvm", pythonpath=_broken_unicorn(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "test_simulator_module" not in out  # not an import error: not collected
    assert "not collected without the simulator: test_uses_sim.py" in proc.stdout
    assert "the simulator is not installed here" in proc.stdout
    assert out["test_host_feature[kvm]"].startswith("skipped: requires_svm")
