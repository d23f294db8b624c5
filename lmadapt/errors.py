"""The one exception type the CLI turns into a one-line error and exit code 2."""


class LmadaptError(Exception):
    """Bad user input or an unusable file: the message is shown as-is, without a traceback."""
