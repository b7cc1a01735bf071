"""KVM's SEV ASID allocator (arch/x86/kvm/svm/sev.c: sev_asid_new / sev_asid_free).

CPUID Fn8000_001F ECX is the number of encrypted guests the chip supports (the
highest SEV ASID) and EDX the lowest ASID a plain-SEV guest may use; SEV-ES
(and SNP) guests take ASIDs 1 .. EDX-1, plain SEV guests EDX .. ECX (docs/facts.md#facts-10a).

A freed ASID is not reused at once: its cache lines may still hold the old
guest's data, so KVM parks it in a reclaim set.  Only when the allocator runs
dry does it flush (WBINVD on every CPU, then the firmware's DF_FLUSH) and
recycle the parked ASIDs.  If none is left after that, KVM_SEV_INIT fails with
-EBUSY: a kernel errno, no firmware call, so ``fw_error`` is ``None``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from ..errors import SevError


class AsidAllocator:
    """ASID bookkeeping as KVM does it; ``flush`` models WBINVD + DF_FLUSH."""

    def __init__(self, num_asids: int, min_sev_asid: int,
                 flush: Callable[[], None] | None = None):
        if num_asids < 1 or not 1 <= min_sev_asid <= num_asids + 1:
            raise ValueError(f"bad CPUID 0x8000001F ASID config: ECX={num_asids} "
                             f"EDX={min_sev_asid}")
        self.num_asids = num_asids  # CPUID 0x8000001F ECX
        self.min_sev_asid = min_sev_asid  # CPUID 0x8000001F EDX
        self._flush = flush
        self._used: set[int] = set()  # sev_asid_bitmap
        self._reclaim: set[int] = set()  # sev_reclaim_asid_bitmap

    def range_for(self, es: bool) -> range:
        """ASIDs a guest of this kind may use."""
        if es:
            return range(1, self.min_sev_asid)
        return range(self.min_sev_asid, self.num_asids + 1)

    def allocate(self, es: bool, command: str = "KVM_SEV_INIT") -> int:
        """sev_asid_new: the lowest free ASID of the kind, or EBUSY."""
        asids = self.range_for(es)
        for attempt in (0, 1):
            for asid in asids:
                if asid not in self._used:
                    self._used.add(asid)
                    return asid
            if attempt == 0 and self._reclaim & set(asids):
                self.recycle()
        kind = "SEV-ES" if es else "SEV"
        raise SevError(command, errno.EBUSY, None,
                       f"no free {kind} ASID (range {asids.start}..{asids.stop - 1}, "
                       f"{len(self._used & set(asids))} in use); destroy an encrypted VM first")

    def free(self, asid: int) -> None:
        """sev_asid_free: park the ASID until the next recycle."""
        if asid not in self._used or asid in self._reclaim:
            raise ValueError(f"ASID {asid} is not allocated")
        self._reclaim.add(asid)

    def recycle(self) -> None:
        """__sev_recycle_asids: flush, then make every parked ASID free again."""
        if self._flush is not None:
            self._flush()
        self._used -= self._reclaim
        self._reclaim.clear()

    @property
    def in_use(self) -> frozenset[int]:
        """ASIDs allocated and not yet freed."""
        return frozenset(self._used - self._reclaim)
