"""Linear degradation operators ``y = A x`` and their pseudo-inverses.

Images are NCHW tensors in [-1, 1].  Every operator acts on a batch
``(B, *image_shape)`` and produces ``(B, *measurement_shape)``; ``A_pinv`` maps
back.  DDNM-style restoration only needs the range-space projector
``Q = A+ A`` and the null-space projector ``P = I - Q``::

    x_restored = A+ y + P x_generated

All operators satisfy the Moore-Penrose identities ``A A+ A = A``,
``A+ A A+ = A+`` with ``A+ A`` and ``A A+`` symmetric.  The blur operators use a
truncated SVD (see :class:`SeparableOperator`), for which ``A A+ A = A`` holds
only up to the dropped singular values.

Build operators with :func:`make_operator`; :data:`OPERATOR_NAMES` lists them.
Matrices are built once in float64; every call converts them (cached) to the
input's dtype and device.
"""
from __future__ import annotations

import inspect
from numbers import Integral

from deqir_dist.errors import DeqirError
from deqir_dist.physics.base import Operator
from deqir_dist.physics.blur import DeblurAniso, DeblurGauss, DeblurUniform
from deqir_dist.physics.cs import CSWHT
from deqir_dist.physics.inpaint import Inpaint
from deqir_dist.physics.pointwise import Colorize, Denoise
from deqir_dist.physics.sr import SRAvgPool, SRBicubic

# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Operator]] = {
    cls.name: cls
    for cls in (SRAvgPool, SRBicubic, DeblurGauss, DeblurUniform, DeblurAniso, Inpaint, Colorize, CSWHT, Denoise)
}
OPERATOR_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _validate_image_shape(image_shape) -> tuple[int, int, int]:
    try:
        dims = tuple(image_shape)
    except TypeError:
        dims = ()
    if len(dims) != 3 or not all(isinstance(d, Integral) and not isinstance(d, bool) and d > 0 for d in dims):
        raise DeqirError(f"image_shape must be three positive integers (C, H, W), got {image_shape!r}")
    return tuple(int(d) for d in dims)


# the parameters' names in the CLI, manifests and restore_file -> the operator's own
FLAG_NAMES = {"kernel_size": "size", "blur_sigma": "sigma", "mask_fraction": "fraction", "mask_seed": "seed",
              "cs_seed": "seed"}


def make_operator(name: str, image_shape, **params) -> Operator:
    """Build operator ``name`` for images of shape ``image_shape = (C, H, W)``.

    ``params`` are the operator's keyword parameters (see each class), or their names in the
    CLI, manifests and ``restore_file`` (``kernel_size``, ``blur_sigma``, ``mask_fraction``,
    ``mask_seed``, ``cs_seed``: one spelling that works everywhere); unknown names, unknown
    parameters, invalid values and image sizes the operator does not allow raise :class:`DeqirError`.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise DeqirError(f"unknown operator {name!r}; valid operators: {', '.join(OPERATOR_NAMES)}")
    shape = _validate_image_shape(image_shape)
    sig = inspect.signature(cls.__init__).parameters
    for flag, key in FLAG_NAMES.items():
        owner = {"mask_fraction": "inpaint", "mask_seed": "inpaint", "cs_seed": "cs_wht"}.get(flag)
        if flag in params and (name == owner if owner else key in sig):
            if key in params and params[key] != params[flag]:
                raise DeqirError(f"{flag} and {key} name the same parameter of {name!r}; give one")
            params[key] = params.pop(flag)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):
        allowed = [k for k in sig if k not in ("self", "image_shape")]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            valid = ", ".join(allowed) if allowed else "none"
            raise DeqirError(f"unknown parameter(s) {', '.join(unknown)} for operator {name!r}; valid: {valid}")
    return cls(shape, **params)
