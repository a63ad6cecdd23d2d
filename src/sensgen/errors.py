"""The one exception type for user errors.

A `UserError` means the input was wrong (a study file, a dataset file, a CLI value), not
the code. Its message is one paragraph naming what is wrong and how to fix it. The CLI
turns it into exit code 2 without a traceback; anything else is an internal error (exit 1).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

Choice = TypeVar("Choice", bound=StrEnum)


class UserError(ValueError):
    """Bad user input: the message names the field or file and the fix."""


def parse_choice(enum: type[Choice], value: str | Choice, what: str) -> Choice:
    """Turn a user string into a member of `enum`, or raise a UserError listing the choices.

    Example:
        >>> from sensgen.models import Nonlinearity
        >>> parse_choice(Nonlinearity, "relu", "nonlinearity")
        <Nonlinearity.RELU: 'relu'>
    """
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise UserError(f"Unknown {what} {value!r}: choose one of {allowed}.") from None
