"""Measurement files (.pt): a tensor and its operator description, never pickled code."""
from __future__ import annotations

import inspect
import io
import json
import pickle
from pathlib import Path

import torch

from deqir_dist.errors import DeqirError, TooLarge, is_int, one_line
from deqir_dist.io.files import atomic_write
from deqir_dist.io.limits import check_pixels, max_file_bytes, read_file_bytes, zip_members
from deqir_dist.physics.registry import _REGISTRY

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


def measurement_shape_for(task: str, params: dict, image_shape) -> tuple | None:
    """The measurement shape ``task`` with operator ``params`` gives for ``image_shape``, computed
    without building the operator (None where a parameter is invalid: the operator reports it)."""
    cls = _REGISTRY.get(task)
    if cls is None:
        return None
    defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}
    C, H, W = image_shape
    if task.startswith("sr_"):
        s = params.get("scale", defaults.get("scale"))
        return (C, H // s, W // s) if is_int(s) and s > 0 else None
    if task == "cs_wht":
        r = params.get("ratio", defaults.get("ratio"))
        return (C, (H * W) // r) if is_int(r) and r > 0 else None
    if task == "colorize":
        return (1, H, W)
    return (C, H, W)


def load_measurement(path: Path) -> tuple[torch.Tensor, dict]:
    """``(y, description)`` of a .pt measurement, checked before anything is built from it: a
    regular file within the byte cap (io.limits), only tensors unpickled, ``y`` a real floating
    tensor of 2 or 3 dimensions, the description an object with a ``name``, an ``image_shape``
    of three positive integers within the pixel cap, and ``params`` (an object)."""
    data = read_file_bytes(path, "measurement file")
    if not data.startswith((b"PK\x03\x04", b"\x80")):     # torch.save's zip archive, or its legacy pickle
        raise DeqirError(f"cannot read measurement file {path}: not a measurement deqir degrade wrote (not a "
                         "torch file)")
    if data.startswith(b"PK"):     # its members' sizes from the zip directory, before torch inflates any
        size, compressed = zip_members(data, f"measurement file {path}")
        if compressed:
            raise DeqirError(f"cannot read measurement file {path}: it holds compressed (deflated) members, "
                             "which deqir degrade never writes and which could inflate far beyond the file; "
                             "save it with torch.save")
        if size > max_file_bytes():
            raise TooLarge(f"cannot read measurement file {path}: its members hold {size} bytes, over the cap "
                             f"of {max_file_bytes()} bytes (16 x --max-pixels + 1 MiB)")
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        del data
        if not isinstance(obj, dict) or "y" not in obj or "operator" not in obj:
            raise DeqirError("it is not a measurement written by deqir degrade (expected y and operator)")
        y, desc = obj["y"], json.loads(obj["operator"]) if isinstance(obj["operator"], str) else obj["operator"]
    except pickle.UnpicklingError as e:
        raise DeqirError(f"cannot read measurement file {path}: it holds pickled objects beyond tensors, which "
                         "are never loaded (deqir degrade writes only tensors)") from e
    except DeqirError as e:
        raise type(e)(f"cannot read measurement file {path}: {e}") from e
    except Exception as e:  # torch.load raises many types on a file that is not a torch archive
        raise DeqirError(f"cannot read measurement file {path}: not a measurement deqir degrade wrote "
                         f"({one_line(e)})") from e
    bad = f"measurement file {path}:"
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        what = type(y).__name__ if not isinstance(y, torch.Tensor) else f"a {y.dtype} tensor"
        raise DeqirError(f"{bad} y must be a real floating tensor, got {what}")
    if y.layout != torch.strided or y.device.type != "cpu":
        raise DeqirError(f"{bad} y must be a dense (strided) tensor in memory, got a {y.layout} tensor on "
                         f"{y.device.type}")
    if y.dim() not in (2, 3) or y.numel() == 0:
        raise DeqirError(f"{bad} y has shape {tuple(y.shape)}, expected (C, h, w) or (C, m)")
    if not isinstance(desc, dict):
        raise DeqirError(f"{bad} its operator description is a {type(desc).__name__}, not an object")
    shape = desc.get("image_shape")
    if (not isinstance(desc.get("name"), str) or not isinstance(shape, (list, tuple)) or len(shape) != 3
            or not all(is_int(d) and d > 0 for d in shape)):
        raise DeqirError(f"{bad} its operator description needs a \"name\" and an \"image_shape\" of three "
                         f"positive integers, got {one_line(ValueError(json.dumps(desc)[:200]), bare_deqir=True)}")
    if not isinstance(desc.get("params", {}), dict):
        raise DeqirError(f"{bad} its operator \"params\" must be an object")
    check_pixels(shape[2], shape[1], f"{bad} its image")
    return y, desc
