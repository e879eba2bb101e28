"""The one exception type for bad user input: the trainer prints its message and exits (no traceback)."""


class ConfigError(ValueError):
    """A configuration or input problem found before any expensive work starts.

    Messages name the field or file, what was expected and what was found, and how to fix it."""
