"""The one exception type the library raises for bad input, and the number checks that raise it."""
from numbers import Integral, Real


class DeqirError(ValueError):
    """Bad input or an unsatisfiable request. The message is one line, fit for a CLI."""


def is_int(v) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(v, Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A real number (numpy's too), not a bool."""
    return isinstance(v, Real) and not isinstance(v, bool)


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or DeqirError naming ``name``."""
    if not is_int(value) or value < minimum:
        need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise DeqirError(f"{name} must be {need}, got {value!r}")
    return int(value)
