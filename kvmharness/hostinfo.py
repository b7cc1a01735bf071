"""What this host can and cannot do: ``kvmharness info``.

The one module that reads the host itself (/proc, /sys, psutil, /dev/cpu/*/cpuid),
and the place each verdict ("svm / sev / sev-es / sev-snp: usable here, or
exactly why not and how to fix it") is decided, so the CLI, the pytest markers
and the SEV launch errors all say the same thing.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import psutil

from . import backend as _backend
from .backend import KVM_X86_DEFAULT_VM, VM_TYPE_NAMES, kvm_usable
from .x86 import CPUID_SEV

KVM_AMD_PARAMS = Path("/sys/module/kvm_amd/parameters")
KVM_MISC_DEV = Path("/sys/class/misc/kvm/dev")  # "major:minor" of the kernel's /dev/kvm
MODES = ("svm", "sev", "sev-es", "sev-snp")


def kvm_device_path() -> str:
    """The KVM device every command uses: ``KVMHARNESS_KVM_DEVICE``, else /dev/kvm."""
    return _backend.KVM_DEVICE


def sev_device_path() -> str:
    """The SEV device: ``KVMHARNESS_SEV_DEVICE``, else /dev/sev."""
    return _backend.SEV_DEVICE


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _flag(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.upper() in ("Y", "1", "YES", "ON")


def cpu_info() -> dict:
    """Vendor, family, model and flags from /proc/cpuinfo (first CPU)."""
    info = {"vendor": None, "family": None, "model": None, "model_name": None,
            "svm_flag": False, "hypervisor_flag": False, "sev_flags": []}
    text = _read(Path("/proc/cpuinfo")) or ""
    first = text.split("\n\n", 1)[0]
    for line in first.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "vendor_id":
            info["vendor"] = value
        elif key == "cpu family":
            info["family"] = int(value)
        elif key == "model":
            info["model"] = int(value)
        elif key == "model name":
            info["model_name"] = value
        elif key == "flags":
            flags = set(value.split())
            info["svm_flag"] = "svm" in flags
            info["hypervisor_flag"] = "hypervisor" in flags
            info["sev_flags"] = sorted(f for f in flags if f in ("sme", "sev", "sev_es", "sev_snp"))
    return info


def host_cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int] | None:
    """Raw host CPUID through the ``cpuid`` driver (/dev/cpu/0/cpuid), if loaded."""
    try:
        fd = os.open("/dev/cpu/0/cpuid", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, 16, leaf | subleaf << 32)
        return struct.unpack("<4I", data) if len(data) == 16 else None
    except OSError:
        return None
    finally:
        os.close(fd)


def decode_sev_leaf(eax: int, ebx: int, ecx: int, edx: int) -> dict:
    """CPUID 0x8000001F, field by field (docs/facts.md#facts-10a)."""
    return {"raw": [hex(eax), hex(ebx), hex(ecx), hex(edx)],
            "sme": bool(eax & 1), "sev": bool(eax >> 1 & 1), "sev_es": bool(eax >> 3 & 1),
            "sev_snp": bool(eax >> 4 & 1), "c_bit": ebx & 0x3F, "phys_addr_reduction": ebx >> 6 & 0x3F,
            "encrypted_guests": ecx, "min_sev_asid": edx}


def kvm_amd_params() -> dict | None:
    if not KVM_AMD_PARAMS.is_dir():
        return None
    return {p.name: _read(p) for p in sorted(KVM_AMD_PARAMS.iterdir())}


def kvm_amd_param_names() -> tuple[frozenset | None, str]:
    """The parameters this kernel's kvm_amd takes, probed: from sysfs when it is loaded,
    else from ``modinfo``; (None, why) when neither can say."""
    params = kvm_amd_params()
    if params is not None:
        return frozenset(params), f"{KVM_AMD_PARAMS}"
    modinfo = shutil.which("modinfo") or next(
        (p for p in ("/usr/sbin/modinfo", "/sbin/modinfo") if os.access(p, os.X_OK)), None)
    if modinfo is None:
        return None, "kvm_amd is not loaded and modinfo is not installed (package kmod)"
    try:
        proc = subprocess.run([modinfo, "-F", "parm", "kvm_amd"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"modinfo kvm_amd failed: {e}"
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or [f"modinfo exited {proc.returncode}"])[-1]
    names = frozenset(line.split(":", 1)[0].strip() for line in proc.stdout.splitlines() if ":" in line)
    return names, "modinfo kvm_amd"


def _is_kvm_device(st) -> bool | None:
    """Whether a stat result is the kernel's KVM misc device (None: cannot tell)."""
    text = _read(KVM_MISC_DEV)
    if not text or ":" not in text:
        return None
    major, minor = (int(x) for x in text.split(":"))
    return stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == major and os.minor(st.st_rdev) == minor


def kvm_device_info() -> dict:
    path = kvm_device_path()
    usable, why = kvm_usable(path)
    d = {"path": path, "present": os.path.exists(path), "accessible": usable, "why": why,
         "mode": None, "group": None, "api_version": None, "module": None}
    try:
        st = os.stat(path)
    except OSError:
        return d  # no device here: no module provides it
    d["mode"] = stat.filemode(st.st_mode)
    try:
        import grp
        d["group"] = grp.getgrgid(st.st_gid).gr_name
    except (KeyError, ImportError):
        d["group"] = st.st_gid
    if _is_kvm_device(st) is False:
        return d  # some other device node: which module serves it is unknown
    for mod in ("kvm_amd", "kvm_intel", "kvm_pvm"):
        if Path(f"/sys/module/{mod}").is_dir():
            d["module"] = mod
            break
    return d


def _kvm_details() -> tuple[dict, object]:
    """Open /dev/kvm (if usable) and read the capability report."""
    from .errors import HarnessError
    from .factory import open_backend

    try:
        system = open_backend("kvm", kvm_path=kvm_device_path())
    except HarnessError as e:
        return {"error": str(e)}, None
    try:
        caps = system.capabilities
        sev_leaf = caps.sev_leaf
        out = {
            "api_version": caps.api_version,
            "extensions": caps.extensions,
            "vm_types": [VM_TYPE_NAMES.get(t, str(t)) for t in sorted(caps.vm_types)],
            "vm_type_numbers": sorted(caps.vm_types),
            "supported_cpuid_entries": len(caps.supported_cpuid),
            "guest_svm": caps.svm,
            "guest_sev_leaf": decode_sev_leaf(sev_leaf.eax, sev_leaf.ebx, sev_leaf.ecx, sev_leaf.edx)
            if sev_leaf else None,
            "msr_index_list": len(caps.msr_index_list),
            "memory_encrypt_op": _memory_encrypt_probe(system),
        }
        return out, caps
    finally:
        system.close()


def _memory_encrypt_probe(system) -> str:
    """KVM_MEMORY_ENCRYPT_OP(NULL) on a default VM: 0 when KVM has SEV enabled, ENOTTY if not."""
    from .kvm._ffi import KVM_MEMORY_ENCRYPT_OP, ffi, ioctl_raw

    try:
        vm = system.create_vm(KVM_X86_DEFAULT_VM)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return f"could not create a VM: {e}"
    try:
        ret, err = ioctl_raw(vm.fd, KVM_MEMORY_ENCRYPT_OP, ffi.NULL)
        if ret == 0:
            return "supported"
        return f"{errno.errorcode.get(err, err)}"
    finally:
        vm.close()


def _param_advice(mode: str, param: str, params: dict | None, kernel: str) -> str | None:
    """Why ``param`` does not enable ``mode``, with advice that holds on this kernel; None if
    it is on.  A parameter this kernel's kvm_amd does not have is never advised."""
    value = (params or {}).get(param)
    if _flag(value):
        return None
    names = frozenset(params) if params is not None else kvm_amd_param_names()[0]
    if names is not None and param not in names:
        newer = " (Linux 6.11 and later have it)" if param == "sev_snp" else ""
        return (f"this kernel's kvm_amd ({kernel}) has no {param} parameter, so it cannot run "
                f"{mode} guests: use a kernel whose kvm_amd has it{newer}")
    how = (f"reload kvm_amd with it on (modprobe -r kvm_amd && modprobe kvm_amd {param}=1)"
           if params is not None else f"load kvm_amd with it on (modprobe kvm_amd {param}=1)")
    return (f"kvm_amd parameter {param}={value or 'unset'}: {how}; the firmware must have SME/SEV "
            "enabled and the PSP driver ccp loaded")


def verdicts(kvm: dict, details: dict, cpu: dict, params: dict | None, sev_present: bool,
             kernel: str | None = None) -> dict:
    """For each mode: usable here, or why not and what to do."""
    out = {}
    module = kvm.get("module")
    path = kvm.get("path") or kvm_device_path()
    kernel = kernel or platform.release()
    types = set(details.get("vm_type_numbers", [0]))
    if not kvm["present"]:
        base = (False, f"{path} does not exist: no KVM on this host. Use --backend sim, "
                       "or a remote SVM rig (kvmharness rig check)")
    elif not kvm["accessible"]:
        base = (False, kvm["why"])
    elif module != "kvm_amd":
        base = (False, f"{path} is provided by {module or 'an unknown module'}, not kvm_amd"
                       + ("" if cpu["svm_flag"] else "; the CPU has no 'svm' flag")
                       + ". Run on an AMD host with SVM enabled in firmware and kvm_amd loaded, "
                       "use a remote rig (kvmharness rig), or --backend sim")
    else:
        base = (True, f"kvm_amd is loaded and {path} is accessible")
    out["svm"] = {"usable": base[0], "why": base[1]}
    sev_dev = sev_device_path()

    def sev_mode(mode, param, vm_type):
        if not base[0]:
            return {"usable": False, "why": f"{mode} needs SVM first: {base[1]}"}
        why_not = _param_advice(mode, param, params, kernel)
        flags = cpu.get("sev_flags")
        if why_not and param in (params or {}) and flags is not None and param not in flags:
            # the kernel has the parameter but the CPU does not report the feature: reloading
            # kvm_amd cannot turn it on
            why_not = (f"kvm_amd parameter {param}={params[param]} and the CPU reports no {param} "
                       f"flag in /proc/cpuinfo: this CPU lacks {mode}, or the firmware setup has "
                       "it (or SME) disabled")
        if why_not:
            return {"usable": False, "why": why_not}
        if not sev_present:
            return {"usable": False, "why": f"{sev_dev} does not exist: load the ccp module"}
        if vm_type not in types and details.get("memory_encrypt_op") != "supported":
            return {"usable": False, "why": f"KVM offers neither VM type {vm_type} nor legacy SEV commands"}
        return {"usable": True, "why": f"kvm_amd {param}={params[param]}, {sev_dev} present"}

    out["sev"] = sev_mode("SEV", "sev", 2)
    out["sev-es"] = sev_mode("SEV-ES", "sev_es", 3)
    out["sev-snp"] = sev_mode("SEV-SNP", "sev_snp", 4)
    if out["sev-snp"]["usable"] and 4 not in types:  # no legacy SNP: the VM type or nothing
        out["sev-snp"] = {"usable": False, "why": "KVM_CAP_VM_TYPES does not list KVM_X86_SNP_VM "
                          "(4): this KVM cannot create SEV-SNP VMs (Linux 6.11 or later)"}
    return out


def snp_checks(cpu: dict, host_leaf: dict | None, params: dict | None, details: dict,
               kernel: str | None = None, leaf_source: str = "") -> list[dict]:
    """What SEV-SNP needs on a host, each check with what was seen, and the fix when it fails:

    * ``rmp_cpuid``: CPUID 0x8000001F EAX bit 4 (the CPU has SNP and the RMP); unknown
      (None) when the host's raw CPUID cannot be read;
    * ``rmp_table``: the kernel set up the RMP table -- it reports the ``sev_snp`` flag in
      /proc/cpuinfo only then (the flag is cleared when RMP initialisation fails);
    * ``kvm_amd``: kvm_amd's ``sev_snp`` parameter on (advice only for a parameter this
      kernel's kvm_amd has: :func:`_param_advice`);
    * ``vm_type``: KVM_CAP_VM_TYPES lists KVM_X86_SNP_VM (bit 4).
    """
    kernel = kernel or platform.release()
    out = []
    bit = None if host_leaf is None else bool(host_leaf.get("sev_snp"))
    out.append({"check": "rmp_cpuid", "ok": bit, "saw":
                ("CPUID 0x8000001F EAX bit 4 = " + ("1" if bit else "0")) if bit is not None
                else f"host CPUID not readable: {leaf_source or 'no /dev/cpu/0/cpuid'}",
                "fix": None if bit else (
                    "load the cpuid module (modprobe cpuid) to read the host's CPUID"
                    if bit is None else "this CPU has no SEV-SNP (EPYC 7003 Milan or later has it)")})
    flags = cpu.get("sev_flags") or []
    has = "sev_snp" in flags
    out.append({"check": "rmp_table", "ok": has,
                "saw": f"/proc/cpuinfo SEV flags: {', '.join(flags) or 'none'}",
                "fix": None if has else (
                    "the kernel did not set up the RMP table: enable SNP and SNP memory coverage "
                    "(RMP) in the firmware setup, with SME and SEV, on a kernel built with "
                    "CONFIG_KVM_AMD_SEV")})
    advice = _param_advice("SEV-SNP", "sev_snp", params, kernel)
    if advice is not None and bit is False:
        # a module parameter cannot give a CPU SNP: no reload advice for a CPU without it
        advice = "not applicable: this CPU has no SEV-SNP (see rmp_cpuid)"
    value = (params or {}).get("sev_snp")
    out.append({"check": "kvm_amd", "ok": advice is None,
                "saw": (f"{KVM_AMD_PARAMS}/sev_snp = {value}" if value is not None else
                        "kvm_amd is not loaded" if params is None else
                        "kvm_amd has no sev_snp parameter"),
                "fix": advice})
    types = details.get("vm_type_numbers")
    listed = None if types is None else 4 in types
    out.append({"check": "vm_type", "ok": listed,
                "saw": ("KVM not probed" if types is None else
                        "KVM_CAP_VM_TYPES lists " + (", ".join(VM_TYPE_NAMES.get(t, str(t))
                                                               for t in sorted(types)) or "nothing")),
                "fix": None if listed else (
                    "KVM offers no KVM_X86_SNP_VM: it needs all of the above, and Linux 6.11 or "
                    "later" if types is not None else f"make {kvm_device_path()} accessible to probe it")})
    return out


@functools.cache
def verdict_reason(mode: str) -> str:
    """Why this host cannot do ``mode`` (``kvmharness info``'s verdict), or '' if it can.

    The CLI adds it to an error whose ``host_verdict`` names ``mode``: the bindings
    state the bare fact, the reason for it on this host is this module's to give."""
    try:
        verdict = host_report()["verdicts"].get(mode)
    except Exception as e:  # noqa: BLE001 - the report is advice; never hide the real error
        return f"(the host capability report could not be read: {e})"
    if verdict is None or verdict["usable"]:
        return ""
    return str(verdict["why"])


def host_report() -> dict:
    """Everything ``kvmharness info`` prints, as one JSON-friendly dict."""
    cpu = cpu_info()
    kvm = kvm_device_info()
    details, caps = _kvm_details() if kvm["accessible"] else ({}, None)
    kvm["api_version"] = details.get("api_version")
    params = kvm_amd_params()
    raw_leaf = host_cpuid(CPUID_SEV)
    leaf_source = "/dev/cpu/0/cpuid"
    top = host_cpuid(0x8000_0000)  # a leaf above the highest extended leaf is not this leaf
    if raw_leaf and top and top[0] < CPUID_SEV:  # (Intel answers it with a basic leaf's data)
        raw_leaf = (0, 0, 0, 0)
        leaf_source = (f"/dev/cpu/0/cpuid: the CPU's highest extended leaf is {top[0]:#x}, so it "
                       "has no 0x8000001F (no SME/SEV): read as zeros")
    sev_present = os.path.exists(sev_device_path())
    mem = psutil.virtual_memory()
    report = {
        "kvm": kvm,
        "kvm_details": details,
        "cpu": cpu,
        "kernel": platform.release(),
        "host_sev_leaf": decode_sev_leaf(*raw_leaf) if raw_leaf else None,
        "host_sev_leaf_source": leaf_source if raw_leaf else
        "unavailable (load the 'cpuid' module to read the host's raw CPUID)",
        "kvm_amd": params,
        "nested": _flag(params.get("nested")) if params else None,
        "npt": _flag(params.get("npt")) if params else None,
        "sev_device": {"path": sev_device_path(), "present": sev_present, "api_version": None},
        "memory": {"total": mem.total, "available": mem.available},
        "cpus": psutil.cpu_count(),
    }
    report["verdicts"] = verdicts(kvm, details, cpu, params, sev_present, report["kernel"])
    report["snp"] = snp_checks(cpu, report["host_sev_leaf"], params, details, report["kernel"],
                               report["host_sev_leaf_source"])
    return report


def process_usage() -> dict:
    """This process's open file descriptors, OS threads and resident set size in bytes
    (``kvmharness bench --soak`` reads them before and after each batch of machines)."""
    p = psutil.Process()
    return {"fds": p.num_fds(), "threads": p.num_threads(), "rss": p.memory_info().rss}


def format_report(r: dict) -> str:
    """The human-readable form of :func:`host_report`."""
    lines = []
    k = r["kvm"]
    lines.append(f"{k['path']}: {'present' if k['present'] else 'absent'}"
                 + (f", {k['mode']} group {k['group']}" if k["mode"] else "")
                 + (f", module {k['module']}" if k["module"] else "")
                 + (f", API {k['api_version']}" if k["api_version"] else ""))
    if not k["accessible"]:
        lines.append(f"  {k['why']}")
    c = r["cpu"]
    lines.append(f"CPU: {c['vendor']} family {c['family']:#x} model {c['model']:#x} ({c['model_name']})"
                 if c["family"] is not None else "CPU: unknown")
    lines.append(f"  svm flag: {'yes' if c['svm_flag'] else 'no'}; hypervisor flag: "
                 f"{'yes' if c['hypervisor_flag'] else 'no'}; SEV flags: {', '.join(c['sev_flags']) or 'none'}")
    lines.append(f"kernel: {r['kernel']}")
    d = r.get("kvm_details") or {}
    if d.get("error"):
        lines.append(f"KVM: {d['error']}")
    elif d:
        ext = d["extensions"]
        keys = ", ".join(f"{n.removeprefix('KVM_CAP_')}={v:#x}" if v > 9 else f"{n.removeprefix('KVM_CAP_')}={v}"
                         for n, v in ext.items())
        lines.append(f"KVM caps: {keys}")
        lines.append(f"VM types: {', '.join(d['vm_types'])}")
        lines.append(f"guest CPUID: {d['supported_cpuid_entries']} supported entries; SVM offered to "
                     f"guests: {'yes' if d['guest_svm'] else 'no'}")
        leaf = d.get("guest_sev_leaf")
        if leaf:
            lines.append(f"  guest 0x8000001F: {leaf['raw']} sev={leaf['sev']} sev_es={leaf['sev_es']} "
                         f"c_bit={leaf['c_bit']} guests={leaf['encrypted_guests']} min_asid={leaf['min_sev_asid']}")
        lines.append(f"KVM_MEMORY_ENCRYPT_OP probe: {d['memory_encrypt_op']}")
    hl = r.get("host_sev_leaf")
    lines.append("host CPUID 0x8000001F: " + (
        f"{hl['raw']} sev={hl['sev']} sev_es={hl['sev_es']} sev_snp={hl['sev_snp']} c_bit={hl['c_bit']} "
        f"guests={hl['encrypted_guests']} min_asid={hl['min_sev_asid']}" if hl else r["host_sev_leaf_source"])
        + (f" ({r['host_sev_leaf_source']})" if hl and ":" in r["host_sev_leaf_source"] else ""))
    p = r["kvm_amd"]
    lines.append("kvm_amd: " + (", ".join(f"{n}={v}" for n, v in p.items()
                                          if n in ("sev", "sev_es", "sev_snp", "nested", "npt", "nrips", "avic"))
                                if p is not None else "not loaded"))
    s = r["sev_device"]
    lines.append(f"{s['path']}: {'present' if s['present'] else 'absent'}")
    m = r["memory"]
    lines.append(f"memory: {m['total'] / 2**30:.1f} GiB total, {m['available'] / 2**30:.1f} GiB available; "
                 f"{r['cpus']} CPUs")
    lines.append("SEV-SNP:")
    for c in r.get("snp", []):
        state = "ok" if c["ok"] else ("unknown" if c["ok"] is None else "NO")
        lines.append(f"  {c['check']:9s} {state}: {c['saw']}" + (f" -> {c['fix']}" if c["fix"] else ""))
    lines.append("verdicts:")
    for mode in MODES:
        v = r["verdicts"][mode]
        lines.append(f"  {mode:8s} {'usable' if v['usable'] else 'NOT usable'}: {v['why']}")
    return "\n".join(lines)


#: CPUID registers a host's KVM does not take from KVM_SET_CPUID2, by KVM module.
#: kvm_pvm (these project machines): leaf 1 ECX/EDX come out as (set & mask) | forced
#: and leaf 7.0 EBX/ECX/EDX are fixed whatever is set (measured on kvm_pvm: docs/facts.md#kvm-pvm-cpuid).
#: Keyed (function, index, register); the guest tests and the contract suite exempt
#: exactly these, and only on that module.
KNOWN_CPUID_DEVIATIONS = {
    "kvm_pvm": frozenset({(0x1, 0, "ecx"), (0x1, 0, "edx"), (0x7, 0, "ebx"), (0x7, 0, "ecx"),
                          (0x7, 0, "edx")}),
}


def cpuid_deviations(backend: str) -> frozenset:
    """The CPUID registers the given backend's host is known not to honour."""
    if backend != "kvm":
        return frozenset()
    return KNOWN_CPUID_DEVIATIONS.get(kvm_device_info().get("module"), frozenset())


# -- what a guest needs, probed on a backend ------------------------------------------------
# The manifest says what a guest needs (images.NEEDS); whether a backend offers it is a
# fact about the host, so it is asked of the backend's System here, when a guest runs.

_SEV_NEEDS = {"sev": ("SEV", 2, "sev"), "sev-es": ("SEV-ES", 3, "sev_es")}


def _legacy_sev(system, need: str) -> tuple[bool, str]:
    """A kernel without KVM_CAP_VM_TYPES (before the SEV VM types) runs SEV on a default
    VM through legacy KVM_SEV_INIT / KVM_SEV_ES_INIT: usable when kvm_amd has the mode on,
    the SEV device exists and KVM_MEMORY_ENCRYPT_OP answers on a default VM."""
    mode, _vm_type, param = _SEV_NEEDS[need]
    kvm = kvm_device_info()
    if kvm.get("module") != "kvm_amd":
        return False, (f"no {mode} VM type (the kernel reports no KVM_CAP_VM_TYPES) and "
                       f"{kvm['path']} is not kvm_amd's ({kvm.get('module') or 'unknown module'})")
    why_not = _param_advice(mode, param, kvm_amd_params(), platform.release())
    if why_not:
        return False, why_not
    if not os.path.exists(sev_device_path()):
        return False, f"{sev_device_path()} does not exist: load the ccp module"
    probe = _memory_encrypt_probe(system)
    if probe != "supported":
        return False, f"KVM_MEMORY_ENCRYPT_OP on a default VM: {probe} (KVM has no SEV enabled)"
    return True, f"legacy {mode} commands on a default VM (kvm_amd {param}=Y, {sev_device_path()})"


def need_status(system, need: str) -> tuple[bool, str]:
    """Whether the backend ``system`` offers one manifest need, probed now: (met, why)."""
    caps = system.capabilities
    if need == "user-msr-exits":
        value = caps.extensions.get("KVM_CAP_X86_USER_SPACE_MSR", 0)
        return (bool(value), f"KVM_CAP_X86_USER_SPACE_MSR={value}" if value else
                "no userspace MSR exits (KVM_CAP_X86_USER_SPACE_MSR is 0)")
    if need in ("svm", "nested"):
        if caps.svm:
            return True, "SVM is offered to guests (CPUID 0x80000001 ECX bit 2)"
        return False, ("SVM is not offered to guests (CPUID 0x80000001 ECX bit 2 is clear in "
                       "KVM_GET_SUPPORTED_CPUID: no kvm_amd, or kvm_amd nested=0)")
    if need == "sev-snp":
        return _snp_need(system)
    if need in _SEV_NEEDS:
        mode, vm_type, _param = _SEV_NEEDS[need]
        if vm_type in caps.vm_types:
            return True, f"the {system.name} backend offers the {mode} VM type ({vm_type})"
        mask = caps.extensions.get("KVM_CAP_VM_TYPES", 0)
        if mask or system.name != "kvm":
            offered = ", ".join(VM_TYPE_NAMES.get(t, str(t)) for t in sorted(caps.vm_types))
            return False, (f"no {mode} VM type: the {system.name} backend offers VM types {offered}"
                           + (f" (KVM_CAP_VM_TYPES={mask:#x})" if mask else ""))
        return _legacy_sev(system, need)
    raise ValueError(f"unknown need {need!r}")


def _snp_need(system) -> tuple[bool, str]:
    """SEV-SNP: the simulator models it (sim/snp.py); on kvm, KVM_CREATE_VM(KVM_X86_SNP_VM)
    is asked now and its answer (the kernel's errno) is the reason when it refuses."""
    from .backend import KVM_X86_SNP_VM
    from .errors import KvmError

    if system.name == "sim":
        return True, ("the simulator models SEV-SNP (sim/snp.py: SNP firmware, RMP, PVALIDATE, "
                      "page-state changes)")
    caps = system.capabilities
    mask = caps.extensions.get("KVM_CAP_VM_TYPES", 0)
    try:
        vm = system.create_vm(KVM_X86_SNP_VM)
    except KvmError as e:  # the kernel's errno
        err = getattr(e, "errno", None)
        name = errno.errorcode.get(err, str(err)) if err else "failed"
        return False, (f"KVM_CREATE_VM(KVM_X86_SNP_VM={KVM_X86_SNP_VM}) failed with {name}"
                       + (f" ({err})" if err else "") + f" (KVM_CAP_VM_TYPES={mask:#x}): this "
                       "kernel/CPU offers no SEV-SNP VMs (see kvmharness info)")
    except Exception as e:  # noqa: BLE001 - any refusal is the answer: not met
        return False, str(e)
    vm.close()
    return True, f"KVM_CREATE_VM(KVM_X86_SNP_VM={KVM_X86_SNP_VM}) succeeded"


def needs_status(system, needs) -> dict:
    """``{need: (met, why)}`` for each need, probed on ``system``."""
    return {need: need_status(system, need) for need in needs}


def unmet_needs(system, needs) -> list[tuple[str, str]]:
    """The needs ``system`` does not offer here, each with why; [] when it can run the guest."""
    return [(need, why) for need, (met, why) in needs_status(system, needs).items() if not met]
