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
