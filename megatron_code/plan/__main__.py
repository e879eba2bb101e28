"""`python -m megatron_code.plan` (see megatron_code/plan/cli.py)."""
import sys

from megatron_code.plan.cli import main

sys.exit(main())
