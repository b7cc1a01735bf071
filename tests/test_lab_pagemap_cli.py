"""kvmharness lab: the page map (pure logic) and the ``lab`` command."""

from __future__ import annotations

import json
import os
import zlib

import pytest

from kvmharness.cli import main
from kvmharness.lab import pagemap


def test_classify_page():
    assert pagemap.classify_page(bytes(4096), encrypted=False) == "zero"
    text = (b"hello, world " * 400)[:4096]
    assert pagemap.classify_page(text, encrypted=False) == "plaintext"
    assert pagemap.classify_page(text, encrypted=True) == "shared"
    assert pagemap.classify_page(os.urandom(4096), encrypted=True) == "ciphertext"
    assert pagemap.classify_page(os.urandom(4096), encrypted=False) == "ciphertext"


def test_entropy_bounds():
    assert pagemap.entropy(b"") == 0.0
    assert pagemap.entropy(b"\x00" * 100) == 0.0
    assert pagemap.entropy(bytes(range(256)) * 16) == pytest.approx(8.0)


def test_png_is_valid_and_cells_have_their_colours():
    cats = ["zero", "ciphertext", "plaintext", "shared"] * 10 + ["zero"] * 3
    png = pagemap.render(cats)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = pagemap.read_png_size(png)
    assert (width, height) == (32 * 15 + 1, 2 * 15 + 1 + 16)
    rows = pagemap.decode_png_rgb(png)
    assert len(rows) == height and all(len(r) == 3 * width for r in rows)
    for i, cat in enumerate(cats):
        assert pagemap.cell_colour(png, i) == pagemap.COLOURS[cat]
    # every chunk's CRC is right (a viewer would refuse the file otherwise)
    pos = 8
    while pos < len(png):
        n = int.from_bytes(png[pos:pos + 4], "big")
        body = png[pos + 4:pos + 8 + n]
        assert int.from_bytes(png[pos + 8 + n:pos + 12 + n], "big") == zlib.crc32(body)
        pos += 12 + n


def test_lab_command_json(capsys, tmp_path):
    rc = main(["lab", "memview", "--mode", "svm", "--backend", "sim", "--json", "--out", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["scenario"] == "memview" and out["backend"] == "sim" and out["outcome"] == "done"
    assert os.path.exists(out["artifacts"]["pagemap"])


def test_lab_command_text(capsys):
    rc = main(["lab", "regleak", "--backend", "sim"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("lab regleak --mode svm on sim: the hypervisor read the secret registers")
    assert "r12=0x5ec2e7c0ffee1234" in out


def test_lab_command_unavailable_exits_3(capsys, monkeypatch):
    from kvmharness.lab import scenarios

    def refuse(machine, mode):
        raise scenarios.LabUnavailable("not here: a test said so")

    monkeypatch.setattr(scenarios, "remap", refuse)
    rc = main(["lab", "remap", "--backend", "sim"])
    assert rc == 3
    assert "not here: a test said so" in capsys.readouterr().err
