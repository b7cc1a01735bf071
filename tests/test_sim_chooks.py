"""The simulator's IN/OUT hooks in C (sim/simhooks.c) give the same exits, registers and
hardware trace as the Python hooks, and the simulator falls back to the Python hooks where
the library cannot be had (issue 15 item 4).

Each mode runs in its own process: ``KVMHARNESS_SIM_CHOOKS`` is read once, at import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("unicorn")

# 64-bit guest at testing.LOAD, hand-assembled (no binutils needed):
#   mov dx,0x60; in al,dx; out 0x80,al; in eax,0x71; out dx,eax; mov edi,0x9000; mov ecx,3;
#   rep insb; mov esi,0x9000; mov ecx,2; rep outsb; mov ecx,2; 1: out 0x80,al; dec ecx; jnz 1b; hlt
GUEST = ("66ba6000" "ec" "e680" "e571" "ef" "bf00900000" "b903000000" "f36c" "be00900000"
         "b902000000" "f36e" "b902000000" "e680" "ffc9" "75fa" "f4")

SCRIPT = r"""
import json, sys
from kvmharness import exits
from kvmharness.sim import core, simhooks
from kvmharness.sim.system import SimSystem
from kvmharness.sim.testing import long_mode_setup

rows = []
with SimSystem() as system, system.create_vm() as vm:
    vcpu = vm.create_vcpu(0)
    long_mode_setup(vm, vcpu, bytes.fromhex(sys.argv[1]))
    for k in range(40):
        e = vcpu.run()
        r = vcpu.get_regs()
        rows.append([repr(e), r.rip, r.rax, r.rcx, r.rsi, r.rdi, r.rflags])
        if isinstance(e, exits.IoIn):
            vcpu.complete(bytes(range(0x11 * (k + 1) & 0xF0, (0x11 * (k + 1) & 0xF0) + e.size * e.count)))
        elif not isinstance(e, exits.IoOut):
            break
    trace = [repr(t) for t in vcpu.svm.trace]
    mem = vcpu.core.read_phys(0x9000, 8).hex()
    print(json.dumps({"chooks": vcpu.core.chooks, "status": simhooks.status(), "rows": rows,
                      "trace": trace, "mem": mem}))
"""


def _run(env_extra: dict, code: str = GUEST, *, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra)
    env = {k: v for k, v in env.items() if v is not None}  # None: unset
    r = subprocess.run([sys.executable, "-c", SCRIPT, code], capture_output=True, text=True,
                       env=env, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def _have_compiler() -> bool:
    return any(shutil.which(n) for n in (os.environ.get("CC") or "cc", "gcc", "clang"))


@pytest.mark.skipif(not _have_compiler(), reason="no C compiler (cc/gcc/clang) to build simhooks.c")
def test_c_hooks_match_python_hooks_exit_by_exit():
    c = json.loads(_run({"KVMHARNESS_SIM_CHOOKS": "required"}).stdout)
    py = json.loads(_run({"KVMHARNESS_SIM_CHOOKS": "0"}).stdout)
    assert c["chooks"] is True and c["status"].startswith("C ")
    assert py["chooks"] is False and "KVMHARNESS_SIM_CHOOKS=0" in py["status"]
    kinds = [row[0].split("(")[0] for row in c["rows"]]
    # OUT, IN, OUT, IN(eax), OUT(dx), 3 INS elements, 2 OUTS elements, 2 OUTs, then HLT
    assert kinds.count("IoIn") >= 3 and kinds.count("IoOut") >= 6 and kinds[-1] == "Hlt", kinds
    assert c["rows"] == py["rows"]
    assert c["trace"] == py["trace"] and len(c["trace"]) >= 10
    assert c["mem"] == py["mem"]
    default = json.loads(_run({"KVMHARNESS_SIM_CHOOKS": None}).stdout)  # unset: C where it can be had
    assert default["chooks"] is True and default["rows"] == c["rows"]


def test_fallback_without_a_compiler(tmp_path):
    """No packaged library, an empty cache and no compiler on PATH: the Python hooks run."""
    from kvmharness.sim import simhooks

    if simhooks.library_path()[1] == "installed":
        pytest.skip("a packaged simhooks library is installed: the cache fallback is not reached")
    env = {"KVMHARNESS_SIM_CHOOKS": "1", "PATH": str(tmp_path), "CC": "", "XDG_CACHE_HOME": str(tmp_path),
           "TMPDIR": str(tmp_path)}
    out = json.loads(_run(env).stdout)
    assert out["chooks"] is False
    assert "no C compiler" in out["status"]
    assert out["rows"][-1][0].startswith("Hlt")
    unset = json.loads(_run(dict(env, KVMHARNESS_SIM_CHOOKS=None)).stdout)  # the default, quietly
    assert unset["chooks"] is False and "no C compiler" in unset["status"]
    # and asking for them outright is a one-line error naming what is missing
    r = _run(dict(env, KVMHARNESS_SIM_CHOOKS="required"), check=False)
    assert r.returncode != 0
    assert "KVMHARNESS_SIM_CHOOKS=required but the simulator's C hooks are unavailable: no C compiler" in r.stderr


@pytest.mark.skipif(not _have_compiler(), reason="no C compiler (cc/gcc/clang) to build simhooks.c")
def test_library_abi_matches_its_declarations():
    """The compiled struct is the one cffi declares (a mismatch would corrupt the record)."""
    r = subprocess.run(
        [sys.executable, "-c",
         "from kvmharness.sim import simhooks as s; lib = s.load(); "
         "print(lib.sh_abi(), s.ABI, lib.sh_sizeof(), s.ffi.sizeof('struct sh_io'))"],
        capture_output=True, text=True, env=dict(os.environ, KVMHARNESS_SIM_CHOOKS="required"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    abi, want, size, declared = map(int, r.stdout.split())
    assert abi == want and size == declared


MANIFEST_SCRIPT = r"""
import json
from kvmharness.images import load_manifest
from kvmharness.machine import run_guest
from kvmharness.sim import simhooks

def one(image, mode):
    try:
        r = run_guest(image, backend="sim", sev=mode, timeout=20)
    except Exception as e:  # the same error on both sides is the same behaviour
        return f"{type(e).__name__}: {e}"
    return {"outcome": r.outcome, "reports": [list(p) for p in r.reports], "count": r.exit_count,
            "exits": [repr(x.exit) for x in r.exits], "regs": r.regs.to_dict() if r.regs else None,
            "hw": [repr(t) for t in r.hw_trace]}


out = {"status": simhooks.status(), "runs": {}}
for name, image in sorted(load_manifest().items()):
    for mode in image.modes:
        got = one(image, mode)
        if mode == "sev-snp" and isinstance(got, dict):
            # the firmware draws each launch's VMPCKs at random (the secrets page the guest
            # reports from): values that differ between two launches are not compared
            again = one(image, mode)
            if isinstance(again, dict) and len(again["reports"]) == len(got["reports"]):
                got["reports"] = [[k, v if [k, v] == b else "random"]
                                  for (k, v), b in zip(got["reports"], again["reports"])]
        out["runs"][f"{name}/{mode}"] = got
print(json.dumps(out))
"""


@pytest.mark.skipif(not _have_compiler(), reason="no C compiler (cc/gcc/clang) to build simhooks.c")
def test_every_manifest_guest_runs_the_same_with_c_and_python_hooks():
    """Every guest, in every mode it declares (plain, SEV, SEV-ES with its #VC IO, SEV-SNP,
    nested): the C hooks (the default where the library can be had) and the Python hooks
    give the same outcome, reports, exits, final registers and hardware #VMEXIT trace."""
    procs = [subprocess.Popen([sys.executable, "-c", MANIFEST_SCRIPT], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, KVMHARNESS_SIM_CHOOKS=hooks))
             for hooks in ("required", "0")]  # side by side: one process per core
    done = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=900)
            assert p.returncode == 0, stderr[-3000:]
            done.append(json.loads(stdout))
    finally:
        for p in procs:
            p.kill()
    c, py = done
    assert c["status"].startswith("C ") and not py["status"].startswith("C ")
    assert c["runs"].keys() == py["runs"].keys() and len(c["runs"]) >= 40
    differ = [k for k in c["runs"] if c["runs"][k] != py["runs"][k]]
    assert not differ, {k: (c["runs"][k], py["runs"][k]) for k in differ[:2]}
    assert sum(isinstance(v, dict) and v["outcome"] == "done" for v in c["runs"].values()) >= 20
