"""fastgpt: a small-GPT trainer whose hot paths run on fused kernels, proven against
pure-PyTorch reference ops."""

__version__ = "0.1.0"


class FastGPTError(Exception):
    """A mistake the user can fix (bad input, missing file, bad setting).

    The CLI prints its message as one line and exits non-zero, with no traceback.
    """
