"""The command line's error: a mistake in the command's input, reported as one message."""


class CLIError(ValueError):
    """Bad input to ``python -m trak_fast build`` or ``score`` (printed without a traceback)."""
