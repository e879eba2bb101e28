"""Errors of the converter. Every message names the file or tensor, what was expected, what was
found, and what to do; the command line prints it on one line (no traceback) and exits with 2."""
from megatron_code.errors import ConfigError


class ConvertError(ConfigError):
    """Bad input to a conversion (unknown architecture, missing shard, shape or vocabulary
    mismatch, unsupported feature, occupied output directory)."""


class VerifyError(Exception):
    """The converted model's logits differ from the source's by more than the tolerance
    (exit code 1: the conversion ran, its result is wrong)."""
