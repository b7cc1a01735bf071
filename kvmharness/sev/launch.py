"""The SEV / SEV-ES launch a user calls, the same on every backend.

    from kvmharness.sev.launch import SevLaunch
    from kvmharness.sev.session import GuestOwner

    owner = GuestOwner(GuestPolicy.parse("nodbg"))      # holds TEK/TIK
    launch = SevLaunch(machine, mode="sev", owner=owner)
    result = launch.launch(image)     # init .. finish, measurement verified
    print(result.measurement, [s.name for s in result.states])

Two small interfaces sit under it, one per kernel device:

* :class:`SevKvmInterface` -- ``KVM_MEMORY_ENCRYPT_OP`` and the region
  ioctls on one VM fd.  ``kvm.sev.KvmSev`` issues the real ioctls;
  ``sev.kvm_model.KvmSevModel`` models ``arch/x86/kvm/svm/sev.c`` on top of
  the simulated firmware.  Guest memory is always named by guest-physical
  address; each implementation maps it (to the slot's user address on kvm).
* :class:`SevPlatformInterface` -- ``/dev/sev`` (``kvm.sevdev.SevDevice``) or
  its model (``sev.kvm_model.SimulatedSevDevice``).

Both raise :class:`~kvmharness.errors.SevError` carrying the errno *and* the
firmware status, exactly as the kernel reports them.  On a host whose KVM has
no SEV every step fails with ENOTTY and a message saying why (the verdict of
``kvmharness info``).
"""

from __future__ import annotations

import abc
import dataclasses
import errno
import typing

from ..backend import KVM_X86_DEFAULT_VM, Vm
from ..errors import FeatureUnavailable, SevError, UsageError
from .measurement import (
    MEASUREMENT_LEN,
    VMSA_PAGE_SIZE,
    LaunchDigest,
    LaunchMeasurement,
)
from .policy import GuestPolicy, PolicyFlag
from .status import GuestState

MODES = ("sev", "sev-es")
#: include/linux/psp-sev.h SEV_FW_BLOB_MAX_SIZE: the largest blob KVM and
#: /dev/sev copy for the firmware (measurement, certificates, CSR).
SEV_FW_BLOB_MAX_SIZE = 0x4000
BLOCK = 16  # LAUNCH_UPDATE_DATA / DBG_* work on 16-byte granules


def align_up(n: int, to: int = BLOCK) -> int:
    return (n + to - 1) // to * to


def pad_image(image: bytes) -> bytes:
    """The bytes LAUNCH_UPDATE_DATA measures for ``image``: zero-padded to 16 bytes."""
    return bytes(image) + bytes(align_up(len(image)) - len(image))


@dataclasses.dataclass(frozen=True)
class GuestStatusInfo:
    """KVM_SEV_GUEST_STATUS output (``struct kvm_sev_guest_status``)."""

    handle: int
    policy: int
    state: GuestState

    def to_dict(self) -> dict:
        return {"handle": self.handle, "policy": f"0x{self.policy:08x}",
                "policy_text": str(GuestPolicy(self.policy)), "state": self.state.name,
                "state_value": int(self.state)}


# ---------------------------------------------------------------------------
# The two interfaces


def _destructive_guard(command: str, allow: bool) -> None:
    if not allow:
        raise UsageError(f"{command} is destructive (it changes the platform's keys or owner "
                         "and invalidates certificates issued for it); pass "
                         "allow_destructive=True to run it")


class SevPlatformInterface(abc.ABC):
    """``/dev/sev``: the platform commands of the SEV firmware (docs/facts.md#facts-9)."""

    backend: str = "?"
    #: the firmware model behind a simulated platform (``sev.firmware.SimulatedSevFirmware``,
    #: whose ``ark_cert``/``ask_cert`` stand in for AMD's); None for a real /dev/sev
    firmware: typing.Any = None

    @abc.abstractmethod
    def status(self):
        """SEV_PLATFORM_STATUS -> ``firmware.PlatformStatus``."""

    @abc.abstractmethod
    def get_id(self) -> bytes:
        """SEV_GET_ID2 (length queried first): the chip id."""

    @abc.abstractmethod
    def pek_csr(self) -> bytes:
        """SEV_PEK_CSR (length queried first): the unsigned PEK certificate."""

    @abc.abstractmethod
    def pdh_cert_export(self) -> tuple[bytes, bytes]:
        """SEV_PDH_CERT_EXPORT: (PDH certificate, chain PEK||OCA||CEK)."""

    def factory_reset(self, *, allow_destructive: bool = False) -> None:
        """SEV_FACTORY_RESET: forget the owner, new OCA/PEK/PDH (destructive)."""
        _destructive_guard("SEV_FACTORY_RESET", allow_destructive)
        self._factory_reset()

    def pek_gen(self, *, allow_destructive: bool = False) -> None:
        """SEV_PEK_GEN: new self-signed OCA, PEK and PDH (destructive)."""
        _destructive_guard("SEV_PEK_GEN", allow_destructive)
        self._pek_gen()

    def pdh_gen(self, *, allow_destructive: bool = False) -> None:
        """SEV_PDH_GEN: new PDH; sessions made for the old one stop working (destructive)."""
        _destructive_guard("SEV_PDH_GEN", allow_destructive)
        self._pdh_gen()

    def pek_cert_import(self, pek_cert: bytes, oca_cert: bytes, *,
                        allow_destructive: bool = False) -> None:
        """SEV_PEK_CERT_IMPORT: take ownership with an owner-signed PEK (destructive)."""
        _destructive_guard("SEV_PEK_CERT_IMPORT", allow_destructive)
        self._pek_cert_import(pek_cert, oca_cert)

    @abc.abstractmethod
    def _factory_reset(self) -> None: ...

    @abc.abstractmethod
    def _pek_gen(self) -> None: ...

    @abc.abstractmethod
    def _pdh_gen(self) -> None: ...

    @abc.abstractmethod
    def _pek_cert_import(self, pek_cert: bytes, oca_cert: bytes) -> None: ...

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SevKvmInterface(abc.ABC):
    """KVM's SEV commands on one VM, guest memory named by guest-physical address.

    Every method raises :class:`SevError` (errno, firmware status) the way
    the kernel reports the failure.  ``command(name, **args)`` is the same
    call by the kernel's command name (``"LAUNCH_START"``, ``"KVM_SEV_LAUNCH_START"``).
    """

    backend: str = "?"
    vm: typing.Any = None  # the backend's Vm this interface commands

    #: kernel command name (without KVM_SEV_) -> method
    COMMANDS: typing.ClassVar[dict[str, str]] = {
        "INIT": "init", "INIT2": "init", "ES_INIT": "init",
        "MEMORY_ENCRYPT_REG_REGION": "register_region",
        "MEMORY_ENCRYPT_UNREG_REGION": "unregister_region",
        "LAUNCH_START": "launch_start", "LAUNCH_UPDATE_DATA": "launch_update_data",
        "LAUNCH_UPDATE_VMSA": "launch_update_vmsa", "LAUNCH_MEASURE": "launch_measure",
        "LAUNCH_SECRET": "launch_secret", "LAUNCH_FINISH": "launch_finish",
        "GUEST_STATUS": "guest_status", "DBG_DECRYPT": "dbg_decrypt",
        "DBG_ENCRYPT": "dbg_encrypt",
    }

    @abc.abstractmethod
    def init(self, mode: str, *, vmsa_features: int = 0, ghcb_version: int = 0) -> str:
        """KVM_SEV_INIT2 on an SEV VM type, else legacy KVM_SEV_INIT / KVM_SEV_ES_INIT.

        Returns the kernel name of the command issued.
        """

    @abc.abstractmethod
    def register_region(self, gpa: int, size: int) -> None:
        """KVM_MEMORY_ENCRYPT_REG_REGION over guest RAM at ``gpa``."""

    @abc.abstractmethod
    def unregister_region(self, gpa: int, size: int) -> None:
        """KVM_MEMORY_ENCRYPT_UNREG_REGION (exactly a registered range)."""

    @abc.abstractmethod
    def launch_start(self, policy: int, *, handle: int = 0, dh_cert: bytes | None = None,
                     session: bytes | None = None) -> int:
        """KVM_SEV_LAUNCH_START: returns the firmware handle."""

    @abc.abstractmethod
    def launch_update_data(self, gpa: int, length: int) -> None:
        """KVM_SEV_LAUNCH_UPDATE_DATA: measure and encrypt guest memory in place."""

    @abc.abstractmethod
    def launch_update_vmsa(self) -> None:
        """KVM_SEV_LAUNCH_UPDATE_VMSA: every vCPU's VMSA, vCPU 0 first (SEV-ES)."""

    @abc.abstractmethod
    def launch_measure(self, length: int) -> tuple[int, bytes]:
        """KVM_SEV_LAUNCH_MEASURE with a ``length``-byte buffer.

        ``length`` 0 queries: returns (required length, b"").  Otherwise
        returns (length written, the bytes).
        """

    @abc.abstractmethod
    def launch_secret(self, header: bytes, data: bytes, gpa: int) -> None:
        """KVM_SEV_LAUNCH_SECRET: the owner's packet into guest memory at ``gpa``."""

    @abc.abstractmethod
    def launch_finish(self) -> None:
        """KVM_SEV_LAUNCH_FINISH."""

    @abc.abstractmethod
    def guest_status(self) -> GuestStatusInfo:
        """KVM_SEV_GUEST_STATUS."""

    @abc.abstractmethod
    def dbg_decrypt(self, gpa: int, length: int) -> bytes:
        """KVM_SEV_DBG_DECRYPT: plaintext of guest memory (policy without NODBG)."""

    @abc.abstractmethod
    def dbg_encrypt(self, gpa: int, data: bytes) -> None:
        """KVM_SEV_DBG_ENCRYPT: write plaintext into encrypted guest memory."""

    @abc.abstractmethod
    def platform(self) -> SevPlatformInterface:
        """The /dev/sev of this backend (for PDH export and the firmware version)."""

    def close(self) -> None:
        pass

    def command(self, name: str, **args):
        """Issue a command by its kernel name, e.g. ``command("LAUNCH_START", policy=1)``."""
        key = name.upper().removeprefix("KVM_").removeprefix("SEV_")
        method = self.COMMANDS.get(key)
        if method is None:
            raise UsageError(f"unknown SEV command {name!r}; known: {', '.join(self.COMMANDS)}")
        if key in ("INIT", "ES_INIT") and "mode" not in args:
            args["mode"] = "sev" if key == "INIT" else "sev-es"
        return getattr(self, method)(**args)


# ---------------------------------------------------------------------------
# Finding the interface of a VM
#
# Each backend makes its own: ``Vm.sev_interface()`` is part of the backend contract
# (kvmharness/backend.py), KVM's is kvm/sev.py's KvmSev, the simulator's the
# kvm_model.KvmSevModel over its firmware model.  The interface is kept on the VM object
# itself.  (A WeakKeyDictionary keyed by the VM never let go: every interface holds its VM,
# so each entry kept its own key alive -- issue 13.)  The platform (/dev/sev or the
# simulated chip) is opened by kvmharness.factory.open_sev_platform, the layer that knows
# both backends.


def sev_interface_for(vm) -> SevKvmInterface:
    """The SEV interface of a VM (one per VM: it holds the launch's state):
    ``vm.sev_interface()``, FeatureUnavailable where the backend has none."""
    iface: SevKvmInterface = vm.sev_interface()
    return iface


# ---------------------------------------------------------------------------
# The launch


@dataclasses.dataclass
class LaunchResult:
    """What a finished launch established."""

    mode: str
    init_command: str
    handle: int
    policy: GuestPolicy
    measurement: LaunchMeasurement
    launch_digest: bytes | None  # the digest the launch expected (None: VMSA unknown)
    verified: bool  # measurement checked against the owner's TIK
    states: list  # GUEST_STATUS after start, measure, finish
    api: tuple  # (major, minor, build) of the firmware
    #: what the owner's check of PDH_CERT_EXPORT's chain proved (chain.ChainVerification;
    #: None: no owner, or a ready session): with the exported (unsigned) CEK alone,
    #: CEK -> ASK -> ARK is unverified, and it says so
    chain: object = None

    def to_dict(self) -> dict:
        return {"mode": self.mode, "init_command": self.init_command, "handle": self.handle,
                "policy": f"0x{self.policy.value:08x}", "policy_text": str(self.policy),
                "measure": self.measurement.measure.hex(), "mnonce": self.measurement.mnonce.hex(),
                "launch_digest": self.launch_digest.hex() if self.launch_digest else None,
                "verified": self.verified,
                "states": [s.name for s in self.states],
                "api": "{}.{} build {}".format(*self.api),
                "chain": None if self.chain is None else {
                    "ok": self.chain.ok, "complete": self.chain.complete,
                    "unverified": list(self.chain.unverified), "skipped": list(self.chain.skipped),
                    "summary": self.chain.summary()}}


class SevLaunch:
    """One SEV or SEV-ES launch of a VM (or a Machine), step by step or in one call.

    ``policy``: a :class:`GuestPolicy`, an int or text (``"nodbg,es"``);
    default NODBG (plus ES for sev-es).  ``owner``: a
    ``session.GuestOwner`` -- its TIK lets the launch verify the
    measurement, its TEK/TIK make the session blob (from the platform's PDH)
    and the secret packet.  ``session``: a ready ``session.LaunchStart`` when
    the owner is elsewhere.
    """

    def __init__(self, target, mode: str = "sev", policy=None, *, owner=None, session=None,
                 vmsa_features: int = 0, ghcb_version: int = 0):
        if mode not in MODES:
            raise UsageError(f"unknown SEV mode {mode!r}: choose sev or sev-es")
        self.vm = target if isinstance(target, Vm) else target.vm  # a Vm, or a Machine
        self.mode = mode
        self.owner = owner
        if policy is None:
            policy = owner.policy if owner is not None else (
                GuestPolicy(PolicyFlag.NODBG | (PolicyFlag.ES if mode == "sev-es" else 0)))
        elif isinstance(policy, str):
            policy = GuestPolicy.parse(policy)
        elif not isinstance(policy, GuestPolicy):
            policy = GuestPolicy(int(policy))
        if owner is not None and owner.policy.value != policy.value:
            raise UsageError(f"the owner signed policy 0x{owner.policy.value:08x} but the launch "
                             f"asks for 0x{policy.value:08x}; the firmware would refuse the "
                             "session (BAD_MEASUREMENT)")
        if mode == "sev-es" and not policy.es:
            raise UsageError(f"an SEV-ES launch needs the ES policy bit (policy {policy}); "
                             "add 'es'")
        if mode == "sev" and policy.es:
            raise UsageError(f"policy {policy} requires SEV-ES; use mode='sev-es'")
        if session is not None and getattr(session, "policy", policy).value != policy.value:
            raise UsageError(f"the session was made for policy {session.policy} but the launch "
                             f"asks for {policy}; the firmware would refuse it (BAD_MEASUREMENT)")
        self.policy = policy
        self.session = session
        self.vmsa_features = vmsa_features
        self.ghcb_version = ghcb_version
        self.sev = sev_interface_for(self.vm)
        self.digest = LaunchDigest()  # what this launch expects the firmware to hash
        self.handle: int | None = None
        self.init_command: str | None = None
        self.measurement: LaunchMeasurement | None = None
        self.verified = False
        self.states: list = []
        self._vmsa_known = False
        self._platform = None
        self.chain = None  # what the owner's check of the platform's certificate chain proved

    # -- the steps -----------------------------------------------------------
    def platform(self) -> SevPlatformInterface:
        if self._platform is None:
            self._platform = self.sev.platform()
        return self._platform

    def init(self) -> str:
        """KVM_SEV_INIT2 (SEV VM types) or KVM_SEV_INIT / KVM_SEV_ES_INIT (default VM)."""
        self.init_command = self.sev.init(self.mode, vmsa_features=self.vmsa_features,
                                          ghcb_version=self.ghcb_version)
        return self.init_command

    def register_memory(self, regions=None) -> None:
        """KVM_MEMORY_ENCRYPT_REG_REGION over every RAM slot (or the given regions)."""
        for r in (self.vm.regions if regions is None else regions):
            self.sev.register_region(r.gpa, r.size)

    def start(self) -> int:
        """KVM_SEV_LAUNCH_START with the policy and, with an owner, a session."""
        dh_cert = session = None
        if self.session is None and self.owner is not None:
            pdh, chain = self.platform().pdh_cert_export()
            # the owner checks what the exported chain proves; its CEK is unsigned on every
            # real platform (AMD's firmware exports it so), so CEK -> ASK -> ARK needs the
            # KDS's signed CEK (GuestOwner(cek=...)), else it is recorded as unverified
            self.session = self.owner.start(pdh, chain)
            self.chain = self.session.chain
        if self.session is not None:
            dh_cert, session = self.session.dh_cert, self.session.session
        self.handle = self.sev.launch_start(self.policy.value, dh_cert=dh_cert, session=session)
        self._expect(GuestState.LUPDATE, "LAUNCH_START")
        return self.handle

    def update_data(self, gpa: int, length: int, *, expected: bytes | None = None) -> None:
        """KVM_SEV_LAUNCH_UPDATE_DATA over ``gpa``..``gpa+length`` (16-byte aligned).

        ``expected`` is the plaintext the owner intends there (default: what
        guest memory holds now); it extends the digest the launch checks.
        """
        if gpa % BLOCK or length % BLOCK or length <= 0:
            raise UsageError(f"LAUNCH_UPDATE_DATA range {gpa:#x}+{length:#x} must be non-empty "
                             "and 16-byte aligned (address and length)")
        plain = self.vm.read(gpa, length) if expected is None else bytes(expected)
        if len(plain) != length:
            raise UsageError(f"expected content is {len(plain)} bytes for a {length}-byte range")
        self.sev.launch_update_data(gpa, length)
        self.digest.update_data(plain)
        if self.owner is not None:
            self.owner.measure_data(plain)

    def update_vmsa(self, expected_pages=None) -> None:
        """KVM_SEV_LAUNCH_UPDATE_VMSA (SEV-ES): every vCPU's initial state.

        ``expected_pages``: the owner's expected VMSA pages (vCPU order), needed
        to verify the measurement; see :func:`expected_vmsa_pages`.
        """
        if self.mode != "sev-es":
            raise UsageError("LAUNCH_UPDATE_VMSA is for SEV-ES launches only")
        self.sev.launch_update_vmsa()
        for page in expected_pages or ():
            self.digest.update_vmsa(page)
            if self.owner is not None:
                self.owner.measure_vmsa(page)
        self._vmsa_known = expected_pages is not None

    def measure(self) -> LaunchMeasurement:
        """KVM_SEV_LAUNCH_MEASURE: query the length, then read; LUPDATE -> LSECRET."""
        need, _ = self.sev.launch_measure(0)
        if need < MEASUREMENT_LEN or need > SEV_FW_BLOB_MAX_SIZE:
            raise SevError("KVM_SEV_LAUNCH_MEASURE", errno.EINVAL, None,
                           f"firmware asked for a {need}-byte measurement buffer")
        n, raw = self.sev.launch_measure(need)
        self.measurement = LaunchMeasurement.from_bytes(raw[:n])
        self._expect(GuestState.LSECRET, "LAUNCH_MEASURE")
        return self.measurement

    def firmware_version(self) -> tuple[int, int, int]:
        st = self.platform().status()
        return st.api_major, st.api_minor, st.build

    def verify(self) -> None:
        """Check the measurement with the owner's TIK; MeasurementMismatch if it differs."""
        if self.owner is None:
            raise UsageError("verifying the measurement needs the guest owner (its TIK)")
        if self.measurement is None:
            raise UsageError("LAUNCH_MEASURE first")
        if self.mode == "sev-es" and not self._vmsa_known:
            raise UsageError("the SEV-ES measurement covers the VMSA pages: pass the expected "
                             "pages to update_vmsa() (kvmharness.sev.vmsa builds them)")
        major, minor, build = self.firmware_version()
        self.owner.verify(self.measurement, api_major=major, api_minor=minor, build=build,
                          digest=self.digest.digest())
        self.verified = True

    def secret(self, secret, gpa: int) -> None:
        """KVM_SEV_LAUNCH_SECRET: ``secret`` (bytes, built by the owner, or a SecretPacket)."""
        from .session import SecretPacket

        if isinstance(secret, SecretPacket):
            packet = secret
        else:
            if self.owner is None:
                raise UsageError("building a LAUNCH_SECRET packet needs the guest owner")
            packet = self.owner.secret_packet(bytes(secret), measurement=self.measurement)
        self.sev.launch_secret(packet.header.to_bytes(), packet.ciphertext, gpa)

    def finish(self) -> None:
        """KVM_SEV_LAUNCH_FINISH: LSECRET -> RUNNING."""
        self.sev.launch_finish()
        self._expect(GuestState.RUNNING, "LAUNCH_FINISH")

    def status(self) -> GuestStatusInfo:
        return self.sev.guest_status()

    def dbg_decrypt(self, gpa: int, length: int) -> bytes:
        return self.sev.dbg_decrypt(gpa, length)

    def dbg_encrypt(self, gpa: int, data: bytes) -> None:
        self.sev.dbg_encrypt(gpa, data)

    def _expect(self, state: GuestState, after: str) -> None:
        st = self.sev.guest_status()
        self.states.append(st.state)
        if st.state != state:  # the commands succeeded, yet the firmware disagrees
            raise SevError("KVM_SEV_GUEST_STATUS check", 0, None,
                           f"after {after} the guest is {st.state.name}, expected {state.name}")

    # -- the whole flow --------------------------------------------------------
    def launch(self, image: bytes | None = None, *, gpa: int | None = None, ranges=None,
               secret=None, secret_gpa: int | None = None, vmsa_pages=None,
               register: bool = True, after_init=None) -> LaunchResult:
        """init, start, register memory, update (image or ranges), VMSA, measure,
        verify (with an owner), secret (optional), finish -- GUEST_STATUS checked
        after each state change.  A measurement mismatch raises
        ``measurement.MeasurementMismatch`` before any secret is released.

        ``image`` is written at ``gpa`` (default: the harness's guest load
        address), zero-padded to 16 bytes, and is what the owner expects;
        ``ranges`` [(gpa, length)] measures memory as it stands.
        ``after_init(vm)`` runs right after the SEV init: KVM wants vCPUs
        created after it (set their registers there for SEV-ES).
        """
        if image is not None:
            if gpa is None:
                from ..protocol import GUEST_LOAD_ADDR

                gpa = GUEST_LOAD_ADDR
            padded = pad_image(image)
            self.vm.write(gpa, padded)
            spans = [(gpa, len(padded), padded)]
        else:
            spans = [(g, n, None) for g, n in (ranges or ())]
        self.init()
        if after_init is not None:
            after_init(self.vm)
        if self.mode == "sev-es" and vmsa_pages is None:
            try:
                vmsa_pages = expected_vmsa_pages(self.vm, self.vmsa_features)
            except FeatureUnavailable:
                if self.owner is not None:  # it cannot verify without them
                    raise
        # LAUNCH_START, then REG_REGION: the order of the kernel's own users (selftests'
        # sev_vm_launch -> encrypt_region; QEMU's sev_common_kvm_init -> sev_launch_start,
        # then sev_kvm_init's RAM notifier).  KVM accepts either; tests/test_sev_ioctl_sequence.py
        self.start()
        if register:
            self.register_memory()
        for g, n, expected in spans:
            self.update_data(g, n, expected=expected)
        if self.mode == "sev-es":
            self.update_vmsa(vmsa_pages)
        self.measure()
        if self.owner is not None:
            self.verify()
        if secret is not None:
            if secret_gpa is None:
                raise UsageError("a secret needs secret_gpa: where in guest memory it goes")
            self.secret(secret, secret_gpa)
        self.finish()
        known = self.mode == "sev" or self._vmsa_known
        return LaunchResult(self.mode, self.init_command, self.handle, self.policy,
                            self.measurement, self.digest.digest() if known else None,
                            self.verified, list(self.states), self.firmware_version(), self.chain)


def vmsa_page_for_vcpu(vcpu, *, vmsa_features: int = 0, fpu: bool = False) -> bytes:
    """The VMSA page KVM builds for ``vcpu`` at LAUNCH_UPDATE_VMSA (``sev.vmsa.build_vmsa``).

    ``fpu``: the VM was created with an SEV VM type (KVM_SEV_INIT2), so KVM
    copies the x87/SSE state too.  The vCPU's registers come from
    ``get_regs()``/``get_sregs()``; DR7 from ``vcpu.dr7`` (the backend contract's
    (default 0x400, the reset value).  A DR7 with breakpoints raises
    ``ValueError`` (KVM: EINVAL).
    """
    try:
        from .vmsa import build_vmsa
    except ImportError:
        raise FeatureUnavailable("building a VMSA needs kvmharness.sev.vmsa, which is not "
                                 "present") from None
    return build_vmsa(vcpu.get_regs(), vcpu.get_sregs(), sev_features=vmsa_features,
                      dr7=vcpu.dr7, init2=fpu)


def expected_vmsa_pages(vm, vmsa_features: int = 0) -> list[bytes]:
    """The owner's expected initial VMSA pages: one per vCPU, vCPU 0 first."""
    fpu = vm.vm_type != KVM_X86_DEFAULT_VM  # KVM copies x87/SSE state only for INIT2 VM types
    return [vmsa_page_for_vcpu(v, vmsa_features=vmsa_features, fpu=fpu) for v in vm.vcpus]


__all__ = [
    "MODES",
    "VMSA_PAGE_SIZE",
    "GuestStatusInfo",
    "LaunchResult",
    "SevKvmInterface",
    "SevLaunch",
    "SevPlatformInterface",
    "expected_vmsa_pages",
    "pad_image",
    "sev_interface_for",
    "vmsa_page_for_vcpu",
]
