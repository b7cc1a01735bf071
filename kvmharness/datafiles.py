"""Where the files shipped beside the package are: the guests and the C declarations.

Installed, ``guests/`` and ``cdefs/`` are package data (``kvmharness.guests``,
``kvmharness.cdefs``: pyproject.toml maps them into the package); in a source checkout
that was not pip-installed they sit next to the ``kvmharness`` package directory.  This
is the one place that knows both layouts.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when run from one


def data_path(top: str, relative: str = "") -> Path:
    """The path of ``top/relative`` (``top``: "guests" or "cdefs"), installed or in the source
    tree; the installed copy wins where it exists."""
    try:
        base = resources.files(f"kvmharness.{top}")
        installed = Path(str(base.joinpath(relative) if relative else base))
        if installed.exists():
            return installed
    except (ModuleNotFoundError, TypeError):
        pass
    return SOURCE_ROOT / top / relative if relative else SOURCE_ROOT / top


__all__ = ["SOURCE_ROOT", "data_path"]
