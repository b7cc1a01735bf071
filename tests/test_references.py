"""Every reference in the code resolves inside the repository, or names a public source.

The facts the code relies on are written down in docs/facts.md, one anchor per section
(``docs/facts.md#facts-1h``); a reference to a document outside the repository (the
project's working notes), or a bare section sign with no public document named, fails.
Public specifications are cited by name and section, e.g. "APM vol. 2 15.5.1",
"GHCB spec §2.3.1", "SNP ABI 56860 §8.17".
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("kvmharness", "tests", "cdefs", "guests")
           for p in sorted((ROOT / d).rglob("*"))
           if p.suffix in (".py", ".h", ".S", ".c", ".ld", ".toml") and p.is_file()
           and p.name != "test_references.py" and "__pycache__" not in p.parts]

# references into documents that are not part of the repository
OUTSIDE = re.compile(
    r"\bfacts (?:section )?§?\d"                       # "facts 9f", "facts §1h", "facts section 9"
    r"|shared/reference"
    r"|\b(?:svm-sev-facts|dev-kvm-on-these-machines|nested-svm-in-the-rig|unicorn-as-sim-core"
    r"|svm-rig-in-a-box)\.md"
    r"|\bdev-kvm\b|\breference §|the final report")
# a section sign is fine after a named public document, or with a dotted (spec) section number
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)")
PUBLIC = re.compile(r"\b(?:APM|GHCB spec|SEV API|SNP ABI|ABI|API|spec|RFC|PEP)\b")
ANCHOR_LINK = re.compile(r"docs/facts\.md#([\w-]+)|(?<![\w/])#(facts-[\w-]+)")
DOC_LINK = re.compile(r"\bdocs/([\w./-]+\.md)")


def _anchors() -> set[str]:
    return set(re.findall(r'<a id="([\w-]+)"></a>', (ROOT / "docs" / "facts.md").read_text()))


def _lines():
    for path in SOURCES:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            yield f"{path.relative_to(ROOT)}:{lineno}", line


def test_no_reference_points_outside_the_repository():
    bad = [f"{where}: {line.strip()}" for where, line in _lines() if OUTSIDE.search(line)]
    assert bad == [], "\n".join(bad)


def test_every_section_sign_names_a_public_document_or_a_spec_section():
    bad = []
    for where, line in _lines():
        for m in SECTION.finditer(line):
            dotted = "." in m.group(1)
            if not dotted and not PUBLIC.search(line[:m.start()]):
                bad.append(f"{where}: {line.strip()}")
    assert bad == [], "\n".join(bad)


def test_every_facts_anchor_and_doc_link_exists():
    anchors = _anchors()
    missing = []
    for where, line in _lines():
        for m in ANCHOR_LINK.finditer(line):
            anchor = m.group(1) or m.group(2)
            if anchor not in anchors:
                missing.append(f"{where}: #{anchor}")
        for m in DOC_LINK.finditer(line):
            if not (ROOT / "docs" / m.group(1)).exists():
                missing.append(f"{where}: docs/{m.group(1)}")
    assert missing == [], "\n".join(missing)


def test_the_checker_catches_what_it_should():
    assert OUTSIDE.search("layout (facts §1h)") and OUTSIDE.search("see facts 10a")
    assert OUTSIDE.search("(dev-kvm §0)") and OUTSIDE.search("../shared/reference/x.md")
    assert not OUTSIDE.search("docs/facts.md#facts-1h") and not OUTSIDE.search("the facts it saw")
    assert PUBLIC.search("GHCB spec ") and not PUBLIC.search("the model ")
    assert {"facts-1h", "facts-9f", "kvm-pvm-cpl0", "unicorn-memory"} <= _anchors()
