"""``python -m data_tools.sandbox``: see :mod:`data_tools.sandbox.cli`."""
from data_tools.sandbox.cli import main

main()
