import sys

from megatron_code.preflight.cli import main

sys.exit(main())
