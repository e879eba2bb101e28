"""All-or-nothing output directories: a conversion writes into a temporary sibling of the target
and renames it into place only when everything (including --verify) succeeded. On any failure,
Ctrl-C included, the temporary directory is removed and the target is untouched."""
from __future__ import annotations

import contextlib
import os
import shutil

from checkpoints_convert.errors import ConvertError

# Room kept free beyond the bytes a conversion writes (metadata, tokenizer, config files).
_DISK_MARGIN = 64 * 2**20


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_free(out_dir: str, overwrite: bool, inputs: tuple[str, ...] = ()) -> str:
    """Absolute target path, after refusing an occupied target (without --overwrite) and a
    target that is, or contains, one of the inputs."""
    out = os.path.abspath(out_dir)
    for src in inputs:
        src = os.path.abspath(src)
        if _inside(src, out):
            raise ConvertError(f"output {out_dir!r} is, or contains, the input {src!r}; choose another output directory.")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ConvertError(f"output {out_dir!r} exists and is not a directory.")
        if os.listdir(out) and not overwrite:
            raise ConvertError(
                f"output directory {out_dir!r} is not empty; pass --overwrite to replace it or choose another directory."
            )
    return out


def check_disk_space(folder: str, needed_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed_bytes + _DISK_MARGIN:
        raise ConvertError(
            f"not enough disk space in {folder}: the conversion writes {needed_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free."
        )


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool, inputs: tuple[str, ...] = ()):
    """Yields a fresh temporary directory next to out_dir; publishes it as out_dir on success."""
    out = check_output_free(out_dir, overwrite, inputs)
    parent = os.path.dirname(out)
    made_parent = not os.path.isdir(parent)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out}.tmp-convert-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_parent:
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        raise


def _publish(tmp: str, out: str) -> None:
    """Rename tmp to out; an existing out is moved aside first and deleted only afterwards."""
    old = None
    if os.path.exists(out):
        if os.listdir(out):
            old = f"{out}.old-convert-{os.getpid()}"
            os.replace(out, old)
        else:
            os.rmdir(out)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
