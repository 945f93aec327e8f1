"""Strict JSON (non-finite numbers as null), written atomically."""
from __future__ import annotations

import json
import math
from pathlib import Path

from deqir_dist.io.files import atomic_write


def json_safe(obj):
    """``obj`` with every non-finite float (an identical image's PSNR, inf) as None: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    """Strict JSON (non-finite numbers as null), written atomically."""
    data = (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode()
    atomic_write(Path(path), lambda fh: fh.write(data))
