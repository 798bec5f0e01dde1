"""Kubernetes resource quantities in the canonical form the API server writes back.

The API server re-serialises every quantity it stores ("1024Mi" comes back as "1Gi",
2000 as "2k", 0.5 as "500m"). The builders emit canonical strings so that what the
operator sends equals what it reads back, and a resync finds nothing to patch.

Rules (apimachinery's `Quantity.CanonicalizeBytes`): binary suffixes stay binary when the
value is a whole number of at least 1024, with the largest power of 1024 that divides it;
everything else is written as an integer times a power of 1000 (n, u, m, "", k, M, G, T,
P, E), with the largest such power that keeps the integer whole. Values finer than 1n
round up to it, as the API server does.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
DECIMAL = {"n": -3, "u": -2, "m": -1, "": 0, "k": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_PATTERN = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")


def parse(value: int | float | str) -> tuple[Fraction, str]:
    """(exact value, format) of a quantity; format is "binary", "decimal" or "exponent".

    Raises ValueError for text that is not a quantity.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int | float):
        return Fraction(str(value)), "decimal"
    match = _PATTERN.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a quantity (e.g. 2, 500m, 16Gi)")
    number, suffix = Fraction(match.group(1)), match.group(2) or ""
    if suffix in BINARY:
        return number * 1024 ** BINARY[suffix], "binary"
    if suffix[:1] in ("e", "E"):
        return number * Fraction(10) ** int(suffix[1:]), "exponent"
    return number * Fraction(1000) ** DECIMAL[suffix], "decimal"


def canonical(value: int | float | str) -> str:
    """The string the API server stores for `value` (e.g. "1.5Gi" -> "1536Mi")."""
    amount, form = parse(value)
    sign = "-" if amount < 0 else ""
    amount = abs(amount)
    if form == "binary" and amount >= 1024 and amount.denominator == 1:
        whole = int(amount)
        power = 0
        while power < 6 and whole % 1024 ** (power + 1) == 0:
            power += 1
        suffix = next((s for s, p in BINARY.items() if p == power), "")
        return f"{sign}{whole // 1024 ** power}{suffix}"
    # Decimal: count in nano-units (rounding up), then take out whole powers of 1000.
    nanos = math.ceil(amount * 1000 ** 3)
    if nanos == 0:
        return "0"
    power = -3
    while power < 6 and nanos % 1000 == 0:
        nanos //= 1000
        power += 1
    if form == "exponent":
        return f"{sign}{nanos}" + (f"e{3 * power}" if power else "")
    suffix = next(s for s, p in DECIMAL.items() if p == power)
    return f"{sign}{nanos}{suffix}"
