"""The rig inventory: which AMD hosts exist and how to reach them.

A TOML file, named by ``--inventory`` or the ``KVMHARNESS_RIGS`` environment
variable, with one table per rig::

    [rigs.milan-1]
    host = "10.1.2.3"            # required
    port = 22                    # default 22
    user = "ci"                  # required
    key_file = "~/.ssh/rig_ed25519"   # required; relative to the inventory file
    python = "/usr/bin/python3"  # remote interpreter; default "python3"
    labels = ["milan", "sev-es"] # default []
    known_hosts = "rigs.known_hosts"  # default ~/.ssh/known_hosts
    lock_file = "/tmp/kvmharness-rig.lock"  # the rig's flock file; default
                                 # /tmp/kvmharness-rig-<name>.lock (give rigs that are
                                 # one machine under several names the same file)
    power_cycle = "ipmitool -I lanplus -H bmc-1 -U ci -f pw chassis power cycle"
                                 # run here, by `rig run --power-cycle-on-hang`
    kernel = "6.1.*"             # `rig check` says "wrong-kernel" unless uname -r matches

Every problem is a :class:`~kvmharness.errors.UsageError` whose message names
the file, the rig and the field.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib

from ..errors import UsageError

ENV_VAR = "KVMHARNESS_RIGS"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FIELDS = {"host", "port", "user", "key_file", "python", "labels", "known_hosts", "lock_file",
           "power_cycle", "kernel"}


@dataclass(frozen=True)
class Rig:
    """One test rig: an SSH endpoint plus what we know about it up front."""

    name: str
    host: str
    port: int
    user: str
    key_file: Path
    python: str
    labels: tuple[str, ...]
    known_hosts: Path | None  # None: the user's ~/.ssh/known_hosts
    lock_file: str | None = None    # on the rig; None: /tmp/kvmharness-rig-<name>.lock
    power_cycle: str | None = None  # a local shell command that power-cycles the rig
    kernel: str | None = None       # the expected `uname -r` (a glob)

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def inventory_path(option: str | None) -> Path:
    """The inventory file: the option if given, else $KVMHARNESS_RIGS."""
    raw = option or os.environ.get(ENV_VAR)
    if not raw:
        raise UsageError(f"no rig inventory: pass --inventory FILE or set {ENV_VAR}")
    return Path(raw).expanduser()


def load_inventory(path: Path) -> list[Rig]:
    """Parse and validate the inventory; rigs in file order."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"rig inventory {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"rig inventory {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"rig inventory {path} is not valid TOML: {e}") from None
    return parse_inventory(doc, path)


def parse_inventory(doc: dict, path: Path) -> list[Rig]:
    extra = set(doc) - {"rigs"}
    if extra:
        raise UsageError(f"rig inventory {path}: unknown top-level key(s) {', '.join(sorted(extra))}"
                         " (rigs go in [rigs.NAME] tables)")
    tables = doc.get("rigs")
    if not isinstance(tables, dict) or not tables:
        raise UsageError(f"rig inventory {path} defines no rigs (expected [rigs.NAME] tables)")
    base = path.parent
    return [_parse_rig(name, table, path, base) for name, table in tables.items()]


def _parse_rig(name: str, table, path: Path, base: Path) -> Rig:
    where = f"rig inventory {path}: rig {name!r}"
    if not _NAME.match(name):
        raise UsageError(f"{where}: a rig name may hold only letters, digits, '.', '_' and '-'")
    if not isinstance(table, dict):
        raise UsageError(f"{where} must be a table ([rigs.{name}])")
    unknown = set(table) - _FIELDS
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}"
                         f" (known: {', '.join(sorted(_FIELDS))})")

    def text(field: str, default: str | None = None) -> str:
        value = table.get(field, default)
        if value is None:
            raise UsageError(f"{where}: field {field!r} is missing")
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"{where}: field {field!r} must be a non-empty string, not {value!r}")
        return value

    def file(field: str) -> Path:
        p = Path(text(field)).expanduser()
        return p if p.is_absolute() else base / p

    port = table.get("port", 22)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"{where}: field 'port' must be an integer 1-65535, not {port!r}")
    if "lock_file" in table and not text("lock_file").startswith("/"):
        raise UsageError(f"{where}: field 'lock_file' must be an absolute path on the rig, "
                         f"not {table['lock_file']!r}")
    labels = table.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise UsageError(f"{where}: field 'labels' must be a list of strings, not {labels!r}")
    return Rig(
        name=name,
        host=text("host"),
        port=port,
        user=text("user"),
        key_file=file("key_file"),
        python=text("python", "python3"),
        labels=tuple(labels),
        known_hosts=file("known_hosts") if "known_hosts" in table else None,
        lock_file=text("lock_file") if "lock_file" in table else None,
        power_cycle=text("power_cycle") if "power_cycle" in table else None,
        kernel=text("kernel") if "kernel" in table else None,
    )


def select_rigs(rigs: list[Rig], selectors: list[str] | None) -> list[Rig]:
    """Rigs whose name or one of whose labels is among ``selectors`` (all if none).

    A selector that matches nothing is an error, so a typo never silently
    shrinks a CI run.
    """
    if not selectors:
        return list(rigs)
    chosen = []
    for sel in selectors:
        hits = [r for r in rigs if r.name == sel or sel in r.labels]
        if not hits:
            known = sorted({r.name for r in rigs} | {l for r in rigs for l in r.labels})
            raise UsageError(f"--rig {sel!r} matches no rig name or label (known: {', '.join(known)})")
        chosen.extend(r for r in hits if r not in chosen)
    return chosen
