"""benchmarks/te_prepare_carry.py: pruning a shared library's fat binaries to one GPU architecture,
and rewriting a wheel with a replaced member, on synthetic inputs."""
import base64
import hashlib
import struct
import zipfile

from benchmarks.te_prepare_carry import FATBIN_MAGIC, prune_fatbin, repack_wheel

ENTRY_HEADER = 64


def _fatbin(cubins: list[tuple[int, bytes]]) -> bytes:
    """One fat binary: a 16-byte container header, then per cubin a 64-byte entry header (kind 2 =
    ELF, header size, payload size, SM version at byte 28) and its payload."""
    body = b""
    for arch, payload in cubins:
        header = bytearray(ENTRY_HEADER)
        struct.pack_into("<HHIQ", header, 0, 2, 0x101, ENTRY_HEADER, len(payload))
        struct.pack_into("<I", header, 28, arch)
        body += bytes(header) + payload
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def _elf_with_section(name: bytes, content: bytes) -> bytearray:
    """A minimal little-endian ELF64 file: header, shstrtab, one named section, section headers."""
    names = b"\0.shstrtab\0" + name + b"\0"
    names_at, content_at = 64, 64 + len(names)
    shoff = content_at + len(content)
    elf = bytearray(64) + names + content
    elf[0:4] = b"\x7fELF"
    struct.pack_into("<Q", elf, 0x28, shoff)
    struct.pack_into("<HHH", elf, 0x3A, 64, 3, 1)  # section header size, count, index of shstrtab
    for name_index, offset, size in ((0, 0, 0), (1, names_at, len(names)), (11, content_at, len(content))):
        elf += struct.pack("<IIQQQQ", name_index, 1, 0, 0, offset, size) + bytes(24)
    return elf


def test_prune_fatbin_zeroes_only_other_architectures_and_keeps_the_layout():
    sm80, sm90, sm100, sm90_again = b"A" * 40, b"B" * 24, b"C" * 56, b"D" * 8
    section = _fatbin([(80, sm80), (90, sm90), (100, sm100)]) + bytes(8) + _fatbin([(90, sm90_again)])
    elf = _elf_with_section(b".nv_fatbin", section)
    original = bytes(elf)
    kept, zeroed = prune_fatbin(elf, {90})
    assert (kept, zeroed) == (len(sm90) + len(sm90_again), len(sm80) + len(sm100))
    assert len(elf) == len(original)
    for payload in (sm90, sm90_again):
        assert bytes(elf).count(payload) == 1
    for payload in (sm80, sm100):
        assert payload not in bytes(elf)
    # Everything but the two zeroed payloads is byte-identical (headers included).
    differing = [i for i, (a, b) in enumerate(zip(original, elf)) if a != b]
    assert len(differing) == len(sm80) + len(sm100)


def test_repack_wheel_replaces_the_member_and_its_record_line(tmp_path):
    source, target = tmp_path / "pkg-1.0-py3-none-any.whl", tmp_path / "out" / "pkg-1.0-py3-none-any.whl"
    target.parent.mkdir()
    with zipfile.ZipFile(source, "w") as wheel:
        wheel.writestr("pkg/lib.so", b"old bytes")
        wheel.writestr("pkg/__init__.py", b"")
        wheel.writestr("pkg-1.0.dist-info/RECORD", "pkg/lib.so,sha256=xyz,9\npkg/__init__.py,sha256=abc,0\n"
                                                   "pkg-1.0.dist-info/RECORD,,\n")
    repack_wheel(str(source), str(target), "pkg/lib.so", b"new bytes!")
    with zipfile.ZipFile(target) as wheel:
        assert wheel.read("pkg/lib.so") == b"new bytes!"
        record = wheel.read("pkg-1.0.dist-info/RECORD").decode().splitlines()
    digest = base64.urlsafe_b64encode(hashlib.sha256(b"new bytes!").digest()).rstrip(b"=").decode()
    assert record == [f"pkg/lib.so,sha256={digest},10", "pkg/__init__.py,sha256=abc,0", "pkg-1.0.dist-info/RECORD,,"]
