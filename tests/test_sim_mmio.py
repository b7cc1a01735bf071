"""MMIO exits on the simulator: a plain MOV/MOVZX/MOVSX/MOVSXD to or from MMIO is finished
without re-executing it (sim/vcpu.py ``_replay_mov``: the value into its register with the
CPU's partial-register rules, RIP past it, RF clear), and must leave every register exactly
as re-executing the instruction against a scratch page does (the general replay, which runs
the CPU itself).  The fuzz tests hold both against real KVM (tests/test_fuzz.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("unicorn")

from kvmharness import exits  # noqa: E402
from kvmharness.sim.system import SimSystem  # noqa: E402
from kvmharness.sim.testing import long_mode_setup  # noqa: E402
from kvmharness.sim.vcpu import SimVcpu  # noqa: E402

MMIO = 0x1000000  # identity-mapped by long_mode_setup, not backed by a slot
GUEST = bytes.fromhex("".join((
    "48c7c0ffffffff", "48c7c3ffffffff", "48c7c1ffffffff", "48c7c2ffffffff", "48c7c6ffffffff",
    "bf00000001",            # mov edi, MMIO
    "8a07",                  # mov al, [rdi]          keeps the rest of RAX
    "8a6701",                # mov ah, [rdi+1]        bits 8-15 only
    "668b5f02",              # mov bx, [rdi+2]        keeps bits 16-63
    "8b4f04",                # mov ecx, [rdi+4]       zero-extends to 64 bits
    "488b5708",              # mov rdx, [rdi+8]
    "0fb67710",              # movzx esi, byte [rdi+16]
    "480fbf4712",            # movsx rax, word [rdi+18]
    "48635f14",              # movsxd rbx, dword [rdi+20]
    "440fbe4718",            # movsx r8d, byte [rdi+24]
    "883f",                  # mov [rdi], bh          a store: only RIP moves
    "48c7471878563412",      # mov qword [rdi+24], 0x12345678
    "a10000000100000000",    # mov eax, [moffs64 MMIO]
    "f4",                    # hlt
)))


def _trace(code: bytes, monkeypatch, patch=None, base: int = 0x8899AABBCCDDEEF0) -> list:
    """Run ``code`` to its end, completing each MMIO read with ``base + k`` (k: the exit's
    number; the top bit set, so sign extension shows): (exit, RIP, RAX, RBX, RCX, RDX, RSI,
    RDI, RSP, R8, RFLAGS) at every exit.  ``patch``: (object, name, value) set meanwhile."""
    if patch is not None:
        monkeypatch.setattr(*patch)
    rows = []
    with SimSystem() as system, system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        long_mode_setup(vm, vcpu, code)
        for k in range(60):
            e = vcpu.run()
            r = vcpu.get_regs()
            rows.append((repr(e), r.rip, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.r8, r.rflags))
            if isinstance(e, exits.MmioRead):
                vcpu.complete((base + k).to_bytes(8, "little")[:e.size])
            elif not isinstance(e, exits.MmioWrite):
                break
    monkeypatch.undo()
    return rows


def test_a_finished_mov_leaves_the_registers_the_cpu_leaves(monkeypatch):
    generic_replay = (SimVcpu, "_replay_mov", lambda self, rip, data: False)
    fast, generic = _trace(GUEST, monkeypatch), _trace(GUEST, monkeypatch, generic_replay)
    kinds = [row[0].split("(")[0] for row in fast]
    assert kinds.count("MmioRead") == 10 and kinds.count("MmioWrite") == 2 and kinds[-1] == "Hlt", kinds
    assert fast == generic
    final = fast[-1]
    rax, rbx, rcx, rdx, rsi, rdi, _rsp, r8 = final[2:10]
    assert rcx == 0xCCDDEEF3  # mov ecx: zero-extended (the 4th read: k = 3)
    assert rsi == 0xF5 and r8 == 0xFFFFFFF8  # movzx; movsx r8d sign-extends within 32 bits
    assert rbx == 0xFFFFFFFFCCDDEEF7  # movsxd rbx: sign-extended from 32 bits
    assert rdi == MMIO


def test_ah_and_bx_keep_the_rest_of_their_register(monkeypatch):
    rows = _trace(GUEST, monkeypatch)
    after_ah = rows[2]  # the exit after `mov ah` completed is the `mov bx` read
    assert after_ah[2] == 0xFFFFFFFFFFFFF1F0  # AL from read 0, AH from read 1, the rest kept
    after_bx = rows[3]
    assert after_bx[3] == 0xFFFFFFFFFFFFEEF2  # BX from read 2, bits 16-63 kept


RMW_GUEST = bytes.fromhex("".join((
    "bf00000001", "b811223344", "48c7c3ffffffff",
    "800f01",                # or byte [rdi], 1            read, then write
    "014704",                # add [rdi+4], eax
    "48875f08",              # xchg [rdi+8], rbx
    "ff7710",                # push qword [rdi+16]         MMIO read, stack write
    "8f4718",                # pop qword [rdi+24]          stack read, MMIO write
    "394720",                # cmp [rdi+32], eax           read only, flags
    "f7472480000000",        # test dword [rdi+36], 0x80
    "0fba6f2803",            # bts dword [rdi+40], 3
    "f4",
)))


def test_other_mmio_instructions_stop_where_a_counted_rerun_stops(monkeypatch):
    """An MMIO instruction that is not a plain MOV is re-run against a scratch page; with the C
    hooks the engine stops at the next instruction by a stop hook put there (Core.step_to,
    no instruction count, the translated code kept).  Exit by exit it must match the re-run
    under a count of 1 (the CPU executing exactly one instruction)."""
    from kvmharness.sim import core as corem

    if corem._STOP_HOOK is None:
        pytest.skip(f"the simulator's C hooks are not loaded here ({corem.simhooks.status()}): "
                    "every re-run is counted")
    counted_rerun = (corem.Core, "step_to", lambda self, begin, after: None)
    base = 0x80706050403020F1
    hooked = _trace(RMW_GUEST, monkeypatch, base=base)
    counted = _trace(RMW_GUEST, monkeypatch, counted_rerun, base=base)
    kinds = [row[0].split("(")[0] for row in hooked]
    assert kinds[-1] == "Hlt" and kinds.count("MmioRead") >= 7 and kinds.count("MmioWrite") >= 5, kinds
    assert hooked == counted
