"""Two kinds of failure: the user's input (exit 2, with a fix) and parity (exit 1)."""


class VlexportError(Exception):
    """Bad input or an unsupported option. The message names the file, tensor or option and the fix."""

    exit_code = 2


class ParityError(Exception):
    """An exported part or a bundle disagrees with the PyTorch reference."""

    exit_code = 1
