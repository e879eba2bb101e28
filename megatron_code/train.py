"""Entry point: `python -m megatron_code.train` / `mcode-train` (also under torchrun)."""
from __future__ import annotations

import sys

from megatron_code.errors import ConfigError
from megatron_code.training.arguments import parse_args
from megatron_code.training.dry_run import dry_run_report
from megatron_code.training.trainer import train


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        if cfg.launch.dry_run:
            print(dry_run_report(cfg))
        else:
            train(cfg)
    except ConfigError as exc:
        print(f"mcode-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
