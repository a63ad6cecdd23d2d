"""The one exception type for user errors.

A `UserError` means the input was wrong (a study file, a dataset file, a CLI value), not
the code. Its message is one paragraph naming what is wrong and how to fix it. The CLI
turns it into exit code 2 without a traceback; anything else is an internal error (exit 1).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad user input: the message names the field or file and the fix."""
