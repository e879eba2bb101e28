"""Prepare `.te/`: Transformer Engine for the lent GPU machine (H100/H200, Python 3.12, CUDA 13),
small enough for the device tool's 64 MiB carry. Runs on a development machine (it downloads).

    python3 benchmarks/te_prepare_carry.py            # writes .te/ (about 37 MiB; git-ignored)
    # on the GPU machine: python3 benchmarks/te_install.py --site /tmp/site

The core wheel's library is 328 MiB, 251 MiB of it cubins for eight GPU architectures (sm_75 to
sm_120; the script prints these sizes). `prune_fatbin` zeroes, in place, the payload of every cubin not built for the kept
architectures (default sm_90): the library keeps its layout and size, the CUDA runtime still
picks the sm_90 cubin of each fat binary on a Hopper GPU, and the zeros compress away.
"""
from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile

TE_VERSION = "2.20.2"
CORE_LIBRARY = "transformer_engine/wheel_lib/libtransformer_engine.so"
FATBIN_MAGIC = 0xBA55ED50
# What `import transformer_engine.pytorch` needs beyond torch and numpy, and what building its torch
# extension needs beyond a compiler, in case that machine's Python lacks them (cp312 wheels).
CARRIED_PACKAGES = ("pydantic", "einops", "setuptools", "ninja")


def fatbin_section(elf: bytes) -> tuple[int, int]:
    """(file offset, size) of the .nv_fatbin section of an ELF shared library (64-bit, little endian)."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in headers:
        end = elf.index(b"\0", names_offset + name)
        if elf[names_offset + name:end] == b".nv_fatbin":
            return offset, size
    raise ValueError("no .nv_fatbin section")


def prune_fatbin(elf: bytearray, keep_archs: set[int]) -> tuple[int, int]:
    """Zero the cubins of other architectures in place; returns (bytes kept, bytes zeroed)."""
    start, size = fatbin_section(elf)
    pos, kept, zeroed = start, 0, 0
    while pos + 16 <= start + size:
        magic, _version, header_size, body_size = struct.unpack_from("<IHHQ", elf, pos)
        if magic != FATBIN_MAGIC:  # padding between fat binaries
            pos += 8
            continue
        entry, end = pos + header_size, pos + header_size + body_size
        while entry < end:
            _kind, _unknown, entry_header, payload = struct.unpack_from("<HHIQ", elf, entry)
            arch, = struct.unpack_from("<I", elf, entry + 28)
            if arch in keep_archs:
                kept += payload
            else:
                elf[entry + entry_header:entry + entry_header + payload] = bytes(payload)
                zeroed += payload
            entry += entry_header + payload
        pos = end
    return kept, zeroed


def repack_wheel(source: str, target: str, member: str, data: bytes) -> None:
    """Copy a wheel with one member replaced and its RECORD line (sha256, size) updated."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            content = data if info.filename == member else zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [f"{member},sha256={digest},{len(data)}" if line.startswith(member + ",") else line
                         for line in content.decode().splitlines()]
                content = ("\n".join(lines) + "\n").encode()
            zout.writestr(info, content, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def download(packages: list[str], dest: str, cp312: bool, deps: bool = False) -> None:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", dest]
    if cp312:
        command += ["--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
                    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64"]
    command += [] if deps else ["--no-deps"]
    subprocess.run(command + packages, check=True)


def download_sdist(name: str, version: str, dest: str) -> None:
    """The source archive, found on PyPI's simple index and checked against its sha256 (pip
    download would run its setup.py, which refuses a torch without CUDA)."""
    filename = f"{name.replace('-', '_')}-{version}.tar.gz"
    with urllib.request.urlopen(f"https://pypi.org/simple/{name}/", timeout=60) as response:
        page = response.read().decode()
    url, digest = re.search(rf'href="([^"]*/{re.escape(filename)})#sha256=([0-9a-f]+)"', page).groups()
    data = urllib.request.urlopen(url, timeout=120).read()
    if hashlib.sha256(data).hexdigest() != digest:
        raise RuntimeError(f"{filename}: sha256 mismatch")
    with open(os.path.join(dest, filename), "wb") as fh:
        fh.write(data)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".te")
    parser.add_argument("--keep-archs", default="90", help="Comma-separated SM versions whose cubins stay.")
    args = parser.parse_args(argv)
    os.makedirs(os.path.join(args.out, "deps"), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download([f"transformer-engine-cu13=={TE_VERSION}", f"transformer-engine=={TE_VERSION}"], tmp, cp312=False)
        core = glob.glob(os.path.join(tmp, "transformer_engine_cu13-*.whl"))[0]
        with zipfile.ZipFile(core) as wheel:
            library = bytearray(wheel.read(CORE_LIBRARY))
        kept, zeroed = prune_fatbin(library, {int(a) for a in args.keep_archs.split(",")})
        print(f"{CORE_LIBRARY} ({len(library) / 2**20:.0f} MiB): kept {kept / 2**20:.1f} MiB of cubins, "
              f"zeroed {zeroed / 2**20:.1f} MiB")
        pruned = os.path.join(args.out, os.path.basename(core))
        repack_wheel(core, pruned, CORE_LIBRARY, bytes(library))
        print(f"core wheel: {os.path.getsize(core) / 2**20:.0f} MiB -> {os.path.getsize(pruned) / 2**20:.0f} MiB")
        shutil.copy(glob.glob(os.path.join(tmp, "transformer_engine-*.whl"))[0], args.out)
        download(list(CARRIED_PACKAGES), os.path.join(args.out, "deps"), cp312=True, deps=True)
        download_sdist("transformer-engine-torch", TE_VERSION, args.out)
        download(["nvidia-cudnn-frontend", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"], tmp, cp312=True)
        frontend = glob.glob(os.path.join(tmp, "nvidia_cudnn_frontend-*.whl"))
        version = os.path.basename(frontend[0]).split("-")[1]
        headers_archive(frontend, os.path.join(args.out, f"cudnn_frontend-{version}-include.tar.gz"), "include")
        # cuDNN's and NCCL's own headers, searched last: for a machine whose torch came without them.
        libraries = glob.glob(os.path.join(tmp, "nvidia_cudnn_cu13-*.whl")) + glob.glob(
            os.path.join(tmp, "nvidia_nccl_cu13-*.whl"))
        headers_archive(libraries, os.path.join(args.out, "cuda_fallback_headers.tar.gz"), "fallback_include")
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(args.out, "**", "*"), recursive=True))
    print(f"{args.out}/: {total / 2**20:.1f} MiB")


def headers_archive(wheels: list[str], archive: str, root: str) -> None:
    """A .tar.gz of the headers under the wheels' include/ directories, all placed under `root`/."""
    with tarfile.open(archive, "w:gz") as tar:
        for wheel_path in wheels:
            with zipfile.ZipFile(wheel_path) as wheel:
                for name in wheel.namelist():
                    _, found, relative = name.partition("include/")
                    if found and relative and not name.endswith("/"):
                        data = wheel.read(name)
                        info = tarfile.TarInfo(f"{root}/{relative}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
