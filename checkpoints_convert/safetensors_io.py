"""Streaming reads and writes of Hugging Face safetensors checkpoints.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to {dtype, shape, data_offsets}, then the raw bytes. Because the header only needs
names, dtypes and shapes, a shard can be written one tensor at a time after the header: the
converter never holds a whole shard in memory, only the layer it is converting. Reads use
`readinto` on a plain file (no mmap), so pages of the input do not accumulate in the process's
resident set either. The `safetensors` library (which `transformers` uses) reads the result.

Why not `safetensors.torch.save_file`: it takes the whole shard as a dict of tensors, so memory
would grow to a full shard (5 GB by default) per output file.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from checkpoints_convert.errors import ConvertError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def nbytes(shape, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    path: str
    dtype: torch.dtype
    shape: tuple
    start: int
    end: int


def read_header(path: str) -> dict[str, TensorEntry]:
    """Name -> TensorEntry of one .safetensors file (reads only the header)."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise ConvertError(f"{path}: not a readable safetensors file ({exc}).") from None
    data_start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(name, path, DTYPES[info["dtype"]], tuple(info["shape"]),
                                    data_start + begin, data_start + end)
    return entries


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor into fresh memory (the file stays closed in between calls)."""
    size = entry.end - entry.start
    if size != nbytes(entry.shape, entry.dtype):
        raise ConvertError(f"{entry.path}: tensor {entry.name} has {size} bytes for shape {list(entry.shape)} "
                           f"of {entry.dtype}; the file is corrupt.")
    buffer = torch.empty(size, dtype=torch.uint8)
    with open(entry.path, "rb") as fh:
        fh.seek(entry.start)
        view = memoryview(buffer.numpy())
        got = fh.readinto(view) if size else 0
    if got != size:
        raise ConvertError(f"{entry.path}: truncated file (tensor {entry.name} needs {size} bytes, got {got}).")
    return buffer.view(entry.dtype).reshape(entry.shape)


class SafetensorsWriter:
    """Writes one .safetensors file whose tensors are declared up front and then written one at a
    time, in the declared order."""

    def __init__(self, path: str, entries: list[tuple[str, torch.dtype, tuple]]):
        self.path, self.entries, self.next = path, entries, 0
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in entries:
            size = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the library writes it
        self.fh = open(path, "wb")
        self.fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self.entries[self.next]
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise AssertionError(f"writer expected {expected_name} {dtype} {list(shape)}, got "
                                 f"{name} {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().contiguous().cpu().view(torch.uint8).reshape(-1)
        self.fh.write(memoryview(data.numpy()))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.entries):
            raise AssertionError(f"{self.path}: {len(self.entries) - self.next} tensors were never written")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()

    def abort(self) -> None:
        self.fh.close()


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9 bytes (Hugging Face's convention: GB = 10^9, GiB = 2^30)."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1, "": 1}
    s = str(text).strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            number = s[: len(s) - len(unit)].strip()
            try:
                value = int(float(number) * units[unit])
            except ValueError:
                break
            if value > 0:
                return value
            break
    raise ConvertError(f"--max-shard-size: cannot read {text!r}; use a size like 5GB, 500MB or 2GiB.")


def plan_shards(entries: list[tuple[str, torch.dtype, tuple]], max_shard_bytes: int) -> list[list]:
    """Cut the ordered tensors into consecutive shards of at most max_shard_bytes (a tensor larger
    than that gets a shard of its own), as `transformers`' save_pretrained does."""
    shards, current, size = [], [], 0
    for entry in entries:
        n = nbytes(entry[2], entry[1])
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedWriter:
    """The whole model's safetensors output: shards written in order, one tensor at a time, and
    the index file (only when there is more than one shard, as save_pretrained does)."""

    def __init__(self, out_dir: str, entries: list[tuple[str, torch.dtype, tuple]], max_shard_bytes: int):
        self.out_dir = out_dir
        self.shards = plan_shards(entries, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self.total_size = sum(nbytes(shape, dtype) for _, dtype, shape in entries)
        self.weight_map = {e[0]: fname for fname, shard in zip(self.names, self.shards) for e in shard}
        self.index, self.writer = -1, None

    @property
    def largest_shard_bytes(self) -> int:
        return max(sum(nbytes(shape, dtype) for _, dtype, shape in shard) for shard in self.shards)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.writer is None or self.writer.next == len(self.writer.entries):
            if self.writer is not None:
                self.writer.close()
            self.index += 1
            self.writer = SafetensorsWriter(os.path.join(self.out_dir, self.names[self.index]), self.shards[self.index])
        self.writer.write(name, tensor)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.index != len(self.shards) - 1:
            raise AssertionError("not every shard was written")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            with open(os.path.join(self.out_dir, INDEX_FILE), "w") as fh:
                json.dump(index, fh, indent=2)
                fh.write("\n")

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


class HFWeights:
    """The tensors of a Hugging Face model directory: model.safetensors, or the shards named by
    model.safetensors.index.json. Every listed file must exist and hold what the index says."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX_FILE)
        single = os.path.join(hf_dir, SINGLE_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as fh:
                weight_map = json.load(fh).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index_path}: no 'weight_map' in the index.")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            weight_map, files = None, [SINGLE_FILE]
        else:
            others = [f for f in sorted(os.listdir(hf_dir)) if f.endswith((".bin", ".pt", ".pth", ".gguf"))]
            hint = (f" It holds {', '.join(others[:3])}: only safetensors weights are read; load the model "
                    "with transformers and save_pretrained(..., safe_serialization=True) first.") if others else ""
            raise ConvertError(f"{hf_dir}: no {SINGLE_FILE} and no {INDEX_FILE}.{hint}")
        missing = [f for f in files if not os.path.isfile(os.path.join(hf_dir, f))]
        if missing:
            raise ConvertError(
                f"{hf_dir}: {len(missing)} of the {len(files)} weight shards listed in {INDEX_FILE} are missing: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Download the complete model."
            )
        self.entries: dict[str, TensorEntry] = {}
        for f in files:
            for name, entry in read_header(os.path.join(hf_dir, f)).items():
                if weight_map is None or weight_map.get(name) == f:
                    self.entries[name] = entry
        if weight_map is not None:
            absent = [n for n, f in weight_map.items() if n not in self.entries]
            if absent:
                raise ConvertError(f"{hf_dir}: {INDEX_FILE} places {absent[0]} in {weight_map[absent[0]]}, "
                                   "but that file does not contain it; the download is incomplete or mixed.")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return read_tensor(self.entries[name])
