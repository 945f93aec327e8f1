"""Measurement files (.pt): a tensor and its operator description, never pickled code."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from deqir_dist.errors import DeqirError
from deqir_dist.io.files import atomic_write

MEASUREMENT_SUFFIX = ".pt"


def measurement_channels(task: str) -> int:
    return 1 if task == "colorize" else 3


def image_shape_of_measurement(task: str, params: dict, shape) -> tuple[int, int, int]:
    """The image size a measurement image of ``shape`` (C, h, w) comes from."""
    _, h, w = shape
    if task.startswith("sr_"):
        s = int(params.get("scale", 4))
        return (3, h * s, w * s)
    return (3, h, w)


def save_measurement(path: Path, y: torch.Tensor, op) -> None:
    """A non-image measurement: {"y": tensor, "operator": description}, via torch.save, atomically."""
    payload = {"y": y.detach().cpu().contiguous(), "operator": json.dumps(op.describe())}
    atomic_write(path, lambda fh: torch.save(payload, fh))


def load_measurement(path: Path) -> tuple[torch.Tensor, dict]:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
        y, desc = obj["y"], json.loads(obj["operator"])
        if not isinstance(y, torch.Tensor):
            raise TypeError("y is not a tensor")
    except pickle.UnpicklingError as e:
        raise DeqirError(f"cannot read measurement file {path}: it holds pickled objects beyond tensors, which "
                         "are never loaded (deqir degrade writes only tensors)") from e
    except Exception as e:
        raise DeqirError(f"cannot read measurement file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return y, desc
