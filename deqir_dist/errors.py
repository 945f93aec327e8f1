"""The one exception type the library raises for bad input, and the number checks that raise it."""
from __future__ import annotations

import re
from numbers import Integral, Real

import torch


class DeqirError(ValueError):
    """Bad input or an unsatisfiable request. The message is one line, fit for a CLI."""


class TooLarge(DeqirError):
    """A request over one of the caps: pixels, bytes, characters, memory or modelled work (the
    service answers it with 413, every other DeqirError with 400)."""


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


def check_tensor(t, name: str, shape: tuple | None = None) -> torch.Tensor:
    """A floating tensor, finite, of the given shape (None entries match anything)."""
    if not isinstance(t, torch.Tensor):
        raise DeqirError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise DeqirError(f"{name} must be a floating tensor, got {t.dtype}")
    if shape is not None and (t.dim() != len(shape)
                              or any(s is not None and s != d for s, d in zip(shape, t.shape))):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise DeqirError(f"{name} has shape {tuple(t.shape)}, expected {want}")
    if not torch.isfinite(t).all():
        raise DeqirError(f"{name} contains NaN or Inf")
    return t


def one_line(e: BaseException, limit: int | None = None, bare_deqir: bool = False) -> str:
    """An exception as one line, "Type: message" (whitespace and colour codes folded); with
    ``bare_deqir`` a DeqirError is its message alone; ``limit`` truncates the message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(e).split()))
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    if bare_deqir and isinstance(e, DeqirError):
        return text or "error"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
