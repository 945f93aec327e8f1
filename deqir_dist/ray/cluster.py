"""Joining a Ray cluster and checking what a job needs before it starts."""
from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path

from deqir_dist.errors import DeqirError
from deqir_dist.models import load_denoiser
from deqir_dist.models.diffusers_folder import PREFIX as DIFFUSERS, check_diffusers
from deqir_dist.models.loading import ARCHITECTURES, PRESETS, check_checkpoint
from deqir_dist.models.registry import MODEL_NAMES, _diffusers_path, _looks_like_path


def _check_device(device) -> str | None:
    """None, "cpu" or "cuda" (any "cuda:N" becomes "cuda": Ray gives each rank its own GPU as cuda:0)."""
    if device in (None, ""):
        return None
    import torch
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise DeqirError(f"--device must be cpu or cuda for ray-restore, got {device!r}")
    return dev.type


def _check_model(model: str | None, checkpoint: str | None, local: bool = True) -> None:
    """The checks ``load_denoiser`` makes, without building big models or reading their weights:
    known names, and for checkpoint files the header, keys and shapes (torch files are read with
    ``weights_only=True``, memory-mapped when they are zip archives; safetensors by header only).
    For a cluster (``local`` False) a checkpoint path this machine does not have is left to the
    workers, which may see a file system the driver does not."""
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
    name = "builtin" if model is None and checkpoint is None else model
    folder = _diffusers_path(name, checkpoint)
    if folder is not None:                     # configs, scheduler, weight shapes: no weights read
        if local or Path(folder.removeprefix(DIFFUSERS)).exists():
            check_diffusers(folder)
        return
    if name == "builtin":
        load_denoiser("builtin", checkpoint=checkpoint)     # a few MB: checks the shipped file
        return
    if name in (None, "analytic"):
        if checkpoint is not None:
            _check_checkpoint(checkpoint, None, local)
        return
    if name in PRESETS or name in ARCHITECTURES:
        if checkpoint is not None:
            _check_checkpoint(checkpoint, name, local)
        elif name in ARCHITECTURES:
            raise DeqirError(f"model {name!r} needs a checkpoint (ray-restore passes no config)")
        return
    if _looks_like_path(name):
        if checkpoint is not None and os.path.abspath(checkpoint) != os.path.abspath(name):
            raise DeqirError(f"two checkpoint files given ({name} and {checkpoint}); give one")
        _check_checkpoint(name, None, local)
        return
    raise DeqirError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}, or give a checkpoint file")


def _check_checkpoint(path: str, name: str | None, local: bool = True) -> None:
    """``models.loading.check_checkpoint``; on a cluster (``local`` False) a path this machine does
    not have is left to the workers, which may see a file system the driver does not."""
    if not local and not Path(path).exists():
        return
    check_checkpoint(path, name)


def _split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT`` / ``ray://HOST:PORT`` / ``[v6]:PORT``; None for other forms."""
    a = address
    for scheme in ("ray://", "http://", "https://"):
        if a.startswith(scheme):
            a = a[len(scheme):]
            break
    else:
        if "://" in a:
            return None
    a = a.split("/", 1)[0]
    host, sep, port = a.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port)


def _probe_address(address: str, timeout_s: float) -> None:
    """A TCP connection to HOST:PORT: an address nothing listens on fails in one line, at once."""
    hp = _split_address(address)
    if hp is None:
        return
    host, port = hp
    if not 0 < port < 65536:
        raise DeqirError(f"--address {address}: port {port} is out of range")
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, 10.0)):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        if isinstance(e, socket.timeout):
            why = f"no answer within {min(timeout_s, 10.0):g} s"
        raise DeqirError(f"cannot reach Ray at --address {address}: {why} (is the cluster running? "
                         "'ray start --head' starts one; --address local starts a private one)") from None


# Ray's waits for an unreachable GCS: each connection attempt waits for the GCS RPC channel
# (twice: GCS and pubsub) and then for the cluster id; ray.init makes up to 20 attempts.
_GCS_ENV = ("RAY_gcs_rpc_server_connect_timeout_s", "RAY_py_gcs_connect_timeout_s", "RAY_gcs_server_port_wait_time_s")


def _bound_gcs_wait(timeout_s: float) -> dict:
    """Bound ray.init's wait for a cluster's GCS to about ``timeout_s`` seconds: one attempt
    (``RAY_gcs_server_port_wait_time_s``, read by ray.init) of at most ``timeout_s`` (the
    ``RAY_*connect_timeout_s`` settings, read when Ray is imported, so they apply when Ray is not
    imported yet). Variables the user set are kept. Returns the previous values for ``_restore_env``."""
    t = max(1, int(math.ceil(timeout_s)))
    rpc = max(1, t // 5)
    want = {"RAY_gcs_server_port_wait_time_s": "1"}
    if "ray" not in sys.modules:
        want["RAY_gcs_rpc_server_connect_timeout_s"] = str(rpc)
        want["RAY_py_gcs_connect_timeout_s"] = str(max(1, t - 2 * rpc))
    saved = {}
    for k, v in want.items():
        if k not in os.environ:
            saved[k] = None
            os.environ[k] = v
    return saved


def _restore_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _ray_error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    last = [ln for ln in text if ln.strip()]
    msg = last[-1].strip() if last else type(e).__name__
    return f"{type(e).__name__}: {msg}"[:300]
