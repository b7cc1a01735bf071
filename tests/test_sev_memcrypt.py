"""Simulated memory encryption properties (pure logic)."""

import os

import pytest

from kvmharness.sev.memcrypt import GuestKey

PAGE = 4096


@pytest.fixture
def key():
    return GuestKey.from_seed(bytes(range(32)))


def test_round_trip_and_deterministic(key):
    data = os.urandom(3 * PAGE + 48)
    for gpa in (0, 0x1000, 0x7FF0, 0x1234560):
        ct = key.encrypt(gpa, data)
        assert ct != data and len(ct) == len(data)
        assert key.encrypt(gpa, data) == ct
        assert key.decrypt(gpa, ct) == data
    same = GuestKey.from_seed(bytes(range(32)))
    assert same.encrypt(0x5000, data) == key.encrypt(0x5000, data)


def test_equal_plaintext_blocks_differ_by_address(key):
    page = bytes(PAGE)  # 256 identical zero blocks
    ct = key.encrypt(0x2000, page)
    blocks = {ct[i:i + 16] for i in range(0, PAGE, 16)}
    assert len(blocks) == 256
    assert key.encrypt(0x3000, page) != ct


def test_relocated_ciphertext_decrypts_to_garbage(key):
    secret = b"attack at dawn!!" * 4
    ct = key.encrypt(0x10000, secret)
    assert key.decrypt(0x10040, ct) != secret  # moved within the page
    assert key.decrypt(0x20000, ct) != secret  # moved to another page
    assert key.decrypt(0x10000, ct) == secret


def test_other_guest_key_gives_garbage(key):
    data = os.urandom(PAGE)
    assert GuestKey().decrypt(0, key.encrypt(0, data)) != data


def test_sub_page_spans_agree_with_whole_page(key):
    data = os.urandom(2 * PAGE)
    whole = key.encrypt(0x40000, data)
    # a span starting mid-page and crossing a page boundary
    assert key.encrypt(0x40FF0, data[0xFF0:0x1020]) == whole[0xFF0:0x1020]
    assert key.decrypt(0x40100, whole[0x100:0x110]) == data[0x100:0x110]


def test_in_place_on_memoryview(key):
    ram = bytearray(os.urandom(3 * PAGE))
    orig = bytes(ram)
    view = memoryview(ram)[PAGE:2 * PAGE]
    key.encrypt_into(0x9000, view)
    assert ram[:PAGE] == orig[:PAGE] and ram[2 * PAGE:] == orig[2 * PAGE:]
    assert bytes(ram[PAGE:2 * PAGE]) == key.encrypt(0x9000, orig[PAGE:2 * PAGE])
    key.decrypt_into(0x9000, view)
    assert bytes(ram) == orig


@pytest.mark.parametrize("gpa,length", [(8, 16), (0, 15), (0x1001, 32)])
def test_unaligned_refused(key, gpa, length):
    with pytest.raises(ValueError, match="16-byte blocks"):
        key.encrypt(gpa, bytes(length))


def test_key_validation():
    with pytest.raises(ValueError):
        GuestKey(bytes(16), bytes(16))  # XTS needs distinct halves
    with pytest.raises(ValueError):
        GuestKey(bytes(15))
    assert "GuestKey" in repr(GuestKey()) and "00" * 8 not in repr(GuestKey(bytes(16)))
