"""ibot_fast: a fast, fused-kernel trainer for iBOT self-supervised pre-training of ViTs.

Start with `ibot_fast.train` (the training loop), `ibot_fast.config` (every key and the
presets) and `ibot_fast.reference` (the readable truth the fast path is tested against).
"""

__version__ = "0.1.0"


class UserError(Exception):
    """An error the user caused and can fix (bad path, unknown key, wrong checkpoint).

    The command-line entry points print its message as one line and exit with status 2,
    instead of a traceback from deep inside.
    """


def print_error(error: Exception) -> None:
    """`ibot-fast: error: <message>` on stderr in one write, so that the processes of a
    multi-process run, which all report it, do not interleave their lines."""
    import os
    import sys

    line = f"ibot-fast: error: {error}\n"
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), line.encode())
    except (AttributeError, OSError, ValueError):  # a stderr without a file (captured)
        sys.stderr.write(line)
        sys.stderr.flush()
