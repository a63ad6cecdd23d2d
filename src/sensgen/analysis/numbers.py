"""Numbers as text for the report: short, but never rounded onto a value they are not.

Plain rounding misleads exactly where the paper's analysis is sharpest: a training accuracy
of 0.99996 printed to 4 significant digits reads "1", and 99.99% to one decimal "100.0%",
next to an inclusion rule of 100% that the model does not meet. So a number that rounds to
a whole number (or to 0% / 100%) without being exactly that gets more digits until it no
longer does; everything else keeps its short form.

Example:
    >>> significant(0.99996), significant(1.0), significant(0.123456), significant(12345.678)
    ('0.99996', '1', '0.1235', '1.235e+04')
    >>> percent(0.9999, 1), percent(1.0), percent(0.004), percent(0.5)
    ('99.99%', '100%', '0.4%', '50%')
    >>> signed(0.9964), signed(1.0), signed(-0.25), signed(float("nan"))
    ('+0.996', '+1.00', '−0.25', 'n/a')
"""

from __future__ import annotations

import math

_MAX_DIGITS = 17  # enough for any float64 to print exactly


def significant(value: float, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits (``g`` format), more where the short
    form would read as a whole number that ``value`` is not (0.99996 → "0.99996", not "1").

    A form with a decimal point or an exponent already says it is rounded, so it is kept.
    """
    value = float(value)
    if not math.isfinite(value):
        return f"{value:g}"
    for d in range(digits, _MAX_DIGITS + 1):
        text = f"{value:.{d}g}"
        if "." in text or "e" in text or float(text) == value:
            return text
    return repr(value)


def percent(share: float, decimals: int = 0) -> str:
    """``share`` (a fraction) as a percentage with ``decimals`` decimals, more where it
    would otherwise read 0% or 100% without being exactly 0 or 1 (0.9999 → "99.99%")."""
    share = float(share)
    if not math.isfinite(share):
        return "n/a"
    for d in range(decimals, _MAX_DIGITS + 1):
        text = f"{share:.{d}%}"
        shown = float(text.removesuffix("%")) / 100
        if shown not in (0.0, 1.0) or shown == share:
            return text
    return f"{share!r} (as a fraction)"


def signed(value: float, decimals: int = 2) -> str:
    """A correlation-like ``value`` with its sign (a true minus) and ``decimals`` decimals,
    more where it would otherwise read ±1 without being exactly ±1 (a Spearman ρ of
    0.9964 is "+0.996", not a perfect "+1.00"); "n/a" when it is NaN."""
    value = float(value)
    if math.isnan(value):
        return "n/a"
    for d in range(decimals, _MAX_DIGITS + 1):
        text = f"{value:+.{d}f}"
        if abs(float(text)) != 1.0 or abs(value) == 1.0:
            break
    return text.replace("-", "−")
