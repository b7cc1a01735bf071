"""The manifest loader checks every field (issue 13.3): a malformed manifest is one
``GuestImageError`` naming the guest, the field and what is allowed (CLI exit 2), never a
traceback and never silently accepted.  Pure logic, no device."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmharness import images
from kvmharness.cli import main
from kvmharness.errors import EXIT_USAGE, GuestImageError
from kvmharness.images import NEEDS, RUN_MODES, default_modes, load_manifest, parse_manifest

ROOT = Path("/nonexistent-guests")  # parse_manifest never touches the images


def parse(body: str):
    return parse_manifest(textwrap.dedent(body), ROOT)


# -- the holes the issue names, and their neighbours ---------------------------------------

@pytest.mark.parametrize("body, words", [
    # the cases
    ("guest = [1, 2]\n", ["no guests", "[guest.NAME]"]),
    ('[guest.g]\nmode = "real"\nuser_msrs = ["x"]\n', ["[guest.g]", "user_msrs[0]", "whole number", "'x'"]),
    ("", ["has no guests", "[guest.NAME]"]),
    ("# only a comment\n", ["has no guests"]),
    ('[guest.g]\nmode = "real"\ntimeout = nan\n', ["[guest.g]", "timeout", "finite", "nan"]),
    ('[guest.g]\nmode = "real"\nneeds = ["user-msr-exits"]\nuser_msrs = [0x100000000]\n',
     ["[guest.g]", "user_msrs[0]", "32-bit", "0x100000000"]),
    ('[guest.g]\nmode = "real"\ncpuid = [{function = 1, eax = 0x1_0000_0000}]\n',
     ["[guest.g]", "cpuid[0].eax", "32-bit"]),
    ('[guest.g]\nmode = "real"\ncpuid = [{function = 0x1_0000_0001}]\n', ["cpuid[0].function", "32-bit"]),
    # neighbours
    ('[guest.g]\nmode = "real"\ntimeout = inf\n', ["timeout", "finite", "inf"]),
    ('[guest.g]\nmode = "real"\ntimeout = -inf\n', ["timeout", "finite"]),
    ('[guest.g]\nmode = "real"\ntimeout = 0\n', ["timeout", "greater than 0"]),
    ('[guest.g]\nmode = "real"\ntimeout = 1e9\n', ["timeout", "at most 86400"]),
    ('[guest.g]\nmode = "real"\ntimeout = true\n', ["timeout", "number of seconds", "True"]),
    ('[guest.g]\nmode = "real"\ntimeout = "5"\n', ["timeout", "number of seconds"]),
    ('[guest.g]\nmode = "real"\nneeds = ["user-msr-exits"]\nuser_msrs = [-1]\n', ["user_msrs[0]", "0xffffffff"]),
    ('[guest.g]\nmode = "real"\nneeds = ["user-msr-exits"]\nuser_msrs = [true]\n', ["user_msrs[0]", "True"]),
    ('[guest.g]\nmode = "real"\nneeds = ["user-msr-exits"]\nuser_msrs = 5\n', ["user_msrs", "a list"]),
    ('[guest.g]\nmode = "real"\nneeds = ["user-msr-exits"]\nuser_msrs = [1, 1]\n', ["user_msrs", "more than once"]),
    ('[guest.g]\nmode = "real"\nuser_msrs = [0x10]\n', ["user_msrs", "user-msr-exits"]),
    ('[guest.g]\nmode = "real"\ncpuid = [{function = 1, eax = -1}]\n', ["cpuid[0].eax"]),
    ('[guest.g]\nmode = "real"\ncpuid = [{function = 1, eax = 1.5}]\n', ["cpuid[0].eax", "1.5"]),
    ('[guest.g]\nmode = "real"\ncpuid = [{function = 1, colour = 2}]\n', ["cpuid[0]", "colour"]),
    ('[guest.g]\nmode = "real"\ncpuid = [1]\n', ["cpuid[0]", "table"]),
    ('[guest.g]\nmode = "real"\ncpuid = {function = 1}\n', ["cpuid", "a list"]),
    ('[guest.g]\nmode = "real"\ncpuid = [{function = 1}, {function = 1}]\n', ["cpuid[1]", "repeats"]),
    ('[guest.g]\nmode = 3\n', ["[guest.g]", "mode must be one of real, long64", "3"]),
    ('[guest.g]\nmemory = "2M"\n', ["[guest.g]", "mode is required"]),
    ('[guest.g]\nmode = "real"\nexpect = ["done"]\n', ["expect must be one of"]),
    ('[guest.g]\nmode = "real"\nneeds = "sev"\n', ["needs", "a list"]),
    ('[guest.g]\nmode = "real"\nneeds = [1]\n', ["needs may hold only"]),
    ('[guest.g]\nmode = "real"\nneeds = ["sev", "sev"]\n', ["needs lists sev more than once"]),
    ('[guest.g]\nmode = "real"\nmemory = true\n', ["memory", "a size"]),
    ('[guest.g]\nmode = "real"\nmemory = 1.5\n', ["memory", "a size"]),
    ('[guest.g]\nmode = "real"\nmemory = -4096\n', ["memory", "from 64K"]),
    ('[guest.g]\nmode = "real"\nmemory = "1024G"\n', ["memory", "to 64G"]),
    ('[guest.g]\nmode = "real"\ndescription = 7\n', ["description must be a string"]),
    ('[guest.g]\nmode = "real"\ndescription = """a\nb"""\n', ["description must be one line"]),
    ('[guest.g]\nmode = "real"\nsource = "../../etc/passwd"\n', ["source", "inside the guests directory"]),
    ('[guest.g]\nmode = "real"\nsource = "/etc/passwd"\n', ["source", "inside the guests directory"]),
    ('[guest.g]\nmode = "real"\nsource = 1\n', ["source must be a string"]),
    ('[guest."../x"]\nmode = "real"\n', ["[guest.'../x']", "a guest name is"]),
    ('[guest.g]\nmode = "real"\nunsupported = {kvm = "no SEV-ES here"}\n', ["unsupported", "no host facts"]),
    ('[guest.g]\nmode = "real"\nmodes = ["sev-snp"]\n', ["modes may hold sev-snp only for a guest that needs sev-snp"]),
    ('[guest.g]\nmode = "real"\nmodes = ["sev-snpx"]\n', ["modes may hold only svm, sev, sev-es, sev-snp"]),
    ('[guest.g]\nmode = "real"\nmodes = []\n', ["modes must list at least one"]),
    ('[guest.g]\nmode = "real"\nmodes = "svm"\n', ["modes", "a list"]),
    ('[guest.g]\nmode = "real"\nneeds = ["sev-es"]\nmodes = ["sev"]\n', ["modes must be ['sev-es']"]),
    ('[guest.g]\nmode = "real"\nneeds = ["sev"]\nmodes = ["svm", "sev"]\n', ["modes may not hold svm"]),
    ('[guest.g]\nmode = "real"\nneeds = ["svm"]\nmodes = ["sev"]\n', ["modes must be ['svm']"]),
    ("guest = 3\n", ["has no guests"]),
    ('colour = "red"\n[guest.g]\nmode = "real"\n', ["unknown top-level key(s) ['colour']"]),
    ("[guest]\ng = 3\n", ["[guest.g]", "must be a table"]),
    ("a = = 1\n", ["not valid TOML"]),
])
def test_malformed_fields_are_one_line_errors_naming_guest_and_field(body, words):
    with pytest.raises(GuestImageError) as e:
        parse(body)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)


def test_valid_fields_are_read_exactly():
    g = parse('''
        [guest.g]
        mode = "long64"
        memory = "4M"
        timeout = 2.5
        needs = ["user-msr-exits"]
        modes = ["sev", "svm"]
        expect = "hlt"
        description = "one line"
        source = "src/other.S"
        cpuid = [{function = 0x8000001F, eax = 0xFFFFFFFF}, {function = 7, index = 0, ebx = 1}]
        user_msrs = [0xC0010130, 0xFFFFFFFF, 0]
    ''')["g"]
    assert (g.mode, g.memory, g.timeout, g.expect, g.needs) == ("long64", 4 << 20, 2.5, "hlt",
                                                                 ("user-msr-exits",))
    assert g.modes == ("sev", "svm") and g.default_mode == "sev"
    assert g.source == ROOT / "src/other.S" and g.path == ROOT / "bin/g.bin"
    assert g.user_msrs == (0xC0010130, 0xFFFFFFFF, 0)
    (sev, leaf7) = g.cpuid
    assert (sev.function, sev.eax, sev.flags) == (0x8000001F, 0xFFFFFFFF, 0)
    assert (leaf7.function, leaf7.index, leaf7.ebx, leaf7.flags) == (7, 0, 1, 1)


@pytest.mark.parametrize("needs, modes", [
    ([], ("svm", "sev")),
    (["user-msr-exits"], ("svm", "sev")),
    (["sev"], ("sev",)),
    (["sev-es", "user-msr-exits"], ("sev-es",)),
    (["svm"], ("svm",)),
    (["nested"], ("svm",)),
])
def test_modes_default_from_needs(needs, modes):
    assert default_modes(needs) == modes
    g = parse(f'[guest.g]\nmode = "long64"\nneeds = {json.dumps(needs)}\n')["g"]
    assert g.modes == modes


def test_shipped_manifest_holds_no_host_facts():
    """No entry of the shipped manifest carries a claim about a host: the key that did
    (unsupported) is refused, and the text says nothing of 'this host'."""
    entries = (images.guests_dir() / "manifest.toml").read_text().split("\n[guest.", 1)[1]
    assert "unsupported" not in entries
    assert "this host" not in entries.lower()
    for g in load_manifest().values():
        assert set(g.modes) <= set(RUN_MODES)


# -- CLI: exit 2, one line ------------------------------------------------------------------

@pytest.mark.parametrize("body, words", [
    ("guest = [1, 2]\n", "has no guests"),
    ('[guest.g]\nmode = "real"\ntimeout = nan\n', "[guest.g]: timeout"),
])
@pytest.mark.parametrize("command", [["guests"], ["run", "g", "--backend", "sim"], ["measure", "g"]])
def test_cli_exits_2_with_one_line_on_a_malformed_manifest(tmp_path, monkeypatch, capsys, body, words,
                                                           command):
    (tmp_path / "manifest.toml").write_text(body)
    monkeypatch.setattr(images, "guests_dir", lambda: tmp_path)
    assert main(command) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err, err


def test_unreadable_manifest_is_a_guest_image_error(tmp_path):
    (tmp_path / "bad.toml").write_bytes(b'[guest.g]\nmode = "real"\ndescription = "\xff\xfe"\n')
    with pytest.raises(GuestImageError, match="not UTF-8"):
        load_manifest(tmp_path / "bad.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(GuestImageError, match="cannot read guest manifest"):
        load_manifest(tmp_path / "dir.toml")


def test_tomllib_falls_back_to_tomli(tmp_path):
    """Python 3.10 has no tomllib: images.py then reads TOML with the tomli package (the
    pyproject dependency for python_version < '3.11').  Simulated in a child interpreter by
    hiding tomllib and offering a module under tomli's name."""
    code = textwrap.dedent("""
        import sys, types
        try:
            import tomllib as real
        except ModuleNotFoundError:  # a real 3.10: the installed tomli stands in
            import tomli as real
        fake = types.ModuleType("tomli")
        fake.loads, fake.TOMLDecodeError = real.loads, real.TOMLDecodeError
        sys.modules["tomli"], sys.modules["tomllib"] = fake, None
        import kvmharness.images as images
        assert images.tomllib is fake, images.tomllib
        print(len(images.load_manifest()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == len(load_manifest())


def test_pyproject_requires_tomli_before_311():
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert "tomli>=2; python_version<'3.11'" in text


# -- hypothesis: anything in, success or GuestImageError out ---------------------------------

def _toml_value(v) -> str:
    """A TOML literal for a Python value (the subset the strategies produce)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def _document(guests: dict) -> str:
    out = []
    for name, entry in guests.items():
        if isinstance(entry, dict):
            out.append(f"[guest.{_toml_value(name)}]")
            out += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in entry.items()]
        else:
            out.append(f"guest = {_toml_value(entry)}")  # not a table: the document's guest key
    return "\n".join(out) + "\n"


scalars = (st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1) | st.floats()
           | st.booleans() | st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
           | st.sampled_from(["real", "long64", "2M", "64K", "done", "hlt", "sev", "sev-es", "svm",
                              "user-msr-exits", "nested", "src/x.S", "../x", "1000"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(["function", "index", "eax", "ebx", "ecx",
                                                         "edx", "x"]), inner, max_size=4),
                      max_leaves=8)
fields = st.sampled_from(["mode", "memory", "timeout", "needs", "modes", "expect", "description",
                          "cpuid", "user_msrs", "source", "unsupported", "other"])
good = {"memory": st.sampled_from(["2M", "64K", 8192, "4M"]),
        "timeout": st.floats(min_value=1e-3, max_value=100) | st.integers(1, 100),
        "needs": st.lists(st.sampled_from(["sev", "sev-es", "svm", "nested"]), max_size=1),
        "expect": st.sampled_from(images.EXPECTS),
        "cpuid": st.lists(st.fixed_dictionaries({"function": st.integers(0, (1 << 32) - 1)},
                                                 optional={"eax": st.integers(-1, 1 << 32)}),
                          max_size=2, unique_by=lambda c: c["function"])}
valid = st.fixed_dictionaries({"mode": st.sampled_from(["real", "long64"])}, optional=good)
entries = (valid  # mostly well-formed, so acceptance is exercised as much as refusal
           | st.builds(lambda base, noise: {**base, **noise}, valid,
                       st.dictionaries(fields, values, max_size=2)))
valid_names = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,5}", fullmatch=True)
names = valid_names | st.text(st.characters(blacklist_categories=("Cs",)), max_size=4)


def _check(text: str) -> None:
    try:
        guests = parse_manifest(text, ROOT)
    except GuestImageError as e:
        assert "\n" not in str(e)
        return
    for g in guests.values():  # what the loader accepts is within every field's limits
        assert g.mode in images.MODES and g.expect in images.EXPECTS
        assert math.isfinite(g.timeout) and 0 < g.timeout <= images.MAX_TIMEOUT
        assert g.memory % 4096 == 0 and images.MIN_MEMORY <= g.memory <= images.MAX_MEMORY
        assert set(g.needs) <= set(NEEDS) and g.modes and set(g.modes) <= set(RUN_MODES)
        assert all(0 <= m < 1 << 32 for m in g.user_msrs)
        assert all(0 <= x < 1 << 32 for c in g.cpuid
                   for x in (c.function, c.index, c.eax, c.ebx, c.ecx, c.edx))
        assert g.path.parent == ROOT / "bin" and ROOT in g.source.parents


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(valid_names, entries, max_size=3)
       | st.dictionaries(names, entries | values, max_size=3))
def test_random_manifests_load_or_raise_guest_image_error(guests):
    _check(_document(guests))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('[]{}=."\'\n #,-_0123456789abcdefgimnorstuxy\\')),
               max_size=80))
def test_random_toml_text_loads_or_raises_guest_image_error(text):
    _check(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_random_unicode_text_loads_or_raises_guest_image_error(text):
    _check(text)
