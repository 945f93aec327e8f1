"""Ray Data: ``DeqirRestorer``, a callable class for ``Dataset.map_batches``.

::

    ds = ray.data.read_binary_files(root, include_paths=True)          # columns bytes, path
    out = ds.map_batches(DeqirRestorer, fn_constructor_kwargs={"task": "sr_bicubic", "scale": 4},
                         batch_size=8, compute=ray.data.ActorPoolStrategy(size=2))
    out.write_parquet(dest)        # columns id, png, status, error, iterations, solver, seconds

The constructor's keyword arguments are ``deqir restore``'s flag names (``model``, ``checkpoint``,
``task``, ``scale``, ``mask``, ... ``steps``, ``etw``, ``solver``, ``seed``, ``from_clean``,
``sigma_y``, ``bits``, ``device``, ``threads``, ``max_pixels``), with the same meaning and
defaults. Each row is decoded with the project's own codec and caps (16-bit PNGs, the operator
description a measurement PNG carries, the pixel and byte caps), its noise drawn from
(seed, id) with id the file's stem, so its PNG is byte for byte the one ``deqir restore`` (and
``ray-restore``) writes for the same flags. A row that cannot be restored (a corrupt file, a size
the task cannot measure) is a row with status "error" and the one-line reason; the block goes on.
``gpus_per_worker=P`` > 1: each Ray Data actor starts a gang of P rank actors in its own
placement group (STRICT_PACK: one node; a GPU per rank with ``device="cuda"``, NCCL; else gloo on
CPUs) that shard each image's chain (``restore(distributed=True)``, the ``ray-restore`` worker);
the Ray Data actor itself only ships rows to its gang and returns rank 0's results. A gang needs
``task=``. The gang is released when the actor ends (``close()``).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from deqir_dist.api.restore import check_settings, restore
from deqir_dist.dataset.described import described_task
from deqir_dist.dataset.items import generator_for, load_items
from deqir_dist.dataset.tasks import OP_FLAGS, TASKS, operator_params
from deqir_dist.errors import DeqirError, one_line
from deqir_dist.io.images import write_image
from deqir_dist.io.limits import set_decode_limits
from deqir_dist.models import load_denoiser

# deqir restore's sampler flags, as restore() keyword arguments (apps.flags.restore_kwargs)
SAMPLER_FLAGS = ("steps", "etw", "nw", "sigma_y", "clip_x0", "start", "solver", "stop", "stop_tol", "max_iter",
                 "warm_start", "profile", "window", "blocks", "coarse_steps")
COLUMNS = ("id", "png", "status", "error", "iterations", "solver", "seconds")


class DeqirRestorer:
    """Restores a batch of image files (rows with ``bytes`` and ``path``); see the module doc."""

    def __init__(self, model: str | None = None, checkpoint: str | None = None, task: str | None = None,
                 from_clean: bool = False, seed: int = 0, bits: int = 8, device: str | None = None,
                 threads: int | None = None, max_pixels: int | None = None, gpus_per_worker: int = 1,
                 dist_timeout: float = 600.0, **flags):
        unknown = sorted(set(flags) - set(OP_FLAGS) - set(SAMPLER_FLAGS))
        if unknown:
            raise DeqirError(f"DeqirRestorer: unknown argument(s) {', '.join(unknown)}; it takes deqir restore's "
                             f"flag names (model, task, {', '.join(OP_FLAGS)}, {', '.join(SAMPLER_FLAGS)}, ...)")
        if task is not None and task not in TASKS:
            raise DeqirError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        if bits not in (8, 16):
            raise DeqirError(f"bits must be 8 or 16, got {bits!r}")
        if threads is not None:
            import torch
            torch.set_num_threads(int(threads))
        if max_pixels is not None:
            set_decode_limits(max_pixels=max_pixels)
        self.task, self.from_clean, self.seed, self.bits = task, bool(from_clean), int(seed), bits
        op_flags = {k: v for k, v in flags.items() if k in OP_FLAGS}
        self.params = operator_params(task, op_flags) if task is not None else {}
        if task is None and op_flags:
            raise DeqirError("task flags need task= (without it each measurement PNG's own description is used)")
        self.restore_kw = {k: v for k, v in flags.items() if k in SAMPLER_FLAGS and v is not None}
        check_settings(**self.restore_kw)
        if model is None and checkpoint is None:
            model = "builtin"
        self.gang = None
        if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, int) or gpus_per_worker < 1:
            raise DeqirError(f"gpus_per_worker must be an integer >= 1, got {gpus_per_worker!r}")
        if gpus_per_worker > 1:
            if task is None:
                raise DeqirError("a gang (gpus_per_worker > 1) needs task=")
            if self.restore_kw.get("solver") not in ("picard", "anderson", "parareal"):
                raise DeqirError("a gang (gpus_per_worker > 1) shards the chain: give solver='picard', 'anderson' "
                                 "or 'parareal'")
            spec = {"model": model, "checkpoint": checkpoint, "device": "cuda" if device == "cuda" else "cpu",
                    "threads": int(threads or 1), "task": task, "seed": self.seed, "from_clean": self.from_clean,
                    "bits": bits, "batch": False, "token": "data",
                    "restore": {k: v for k, v in self.restore_kw.items() if k != "sigma_y"}}
            from deqir_dist.io import limits
            self.gang = _Gang({**spec, "limits": limits.current()}, gpus_per_worker, float(dist_timeout))
            self.model = None
            return
        self.model = load_denoiser(model, checkpoint=checkpoint, device=device)

    def close(self) -> None:
        """Release the gang (its actors and placement group), if any."""
        if self.gang is not None:
            self.gang.close()
            self.gang = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __call__(self, batch) -> dict:
        rows = _rows(batch)
        out = {c: [] for c in COLUMNS}
        if self.gang is not None:
            for rec in self.gang.restore(rows, self.params, self.restore_kw.get("sigma_y")):
                for c in COLUMNS:
                    out[c].append(rec.get(c))
            import numpy as np
            return {c: np.array(v, dtype=object) for c, v in out.items()}
        with tempfile.TemporaryDirectory(prefix="deqir-data-") as scratch:
            for data, path in rows:
                rec = self._one(data, path, Path(scratch))
                for c in COLUMNS:
                    out[c].append(rec.get(c))
        import numpy as np
        return {c: np.array(v, dtype=object) for c, v in out.items()}

    def _one(self, data, path, scratch: Path) -> dict:
        name = Path(str(path)).stem
        rec = {"id": name, "png": None, "status": "error", "error": None, "iterations": None, "solver": None,
               "seconds": None}
        t0 = time.perf_counter()
        tmp = scratch / f"{name}{Path(str(path)).suffix}"
        try:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise DeqirError(f"{path}: the bytes column holds {type(data).__name__}, not bytes")
            tmp.write_bytes(bytes(data))
            try:
                task = self.task or described_task([tmp], self.from_clean)
                item = load_items([tmp], task, self.params, self.from_clean, sigma_y=self.restore_kw.get("sigma_y"),
                                  seed=self.seed)[0]
            except DeqirError as e:
                raise type(e)(str(e).replace(str(tmp), str(path))) from None
            kw = dict(self.restore_kw)
            kw.setdefault("sigma_y", item.sigma_y)      # not given: from the file's bit depth, as deqir restore
            res = restore(self.model, item.y, item.op, generator=generator_for(self.seed, item.name), **kw)
            png = scratch / f"{name}.out.png"
            write_image(png, res.image[0], bits=self.bits)
            rec.update(png=png.read_bytes(), status="ok", iterations=int(res.iterations),
                       solver=res.solver)
        except Exception as e:  # noqa: BLE001 - a bad row is a row, never a failed block
            rec["error"] = one_line(e, bare_deqir=True)
        finally:
            for f in (tmp, scratch / f"{name}.out.png"):
                try:
                    os.unlink(f)
                except OSError:
                    pass
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        return rec


def _rows(batch) -> list:
    """(bytes, path) per row of a Ray Data batch: a dict of columns (numpy / lists) or a pandas frame."""
    try:
        cols = {k: list(batch[k]) for k in ("bytes", "path")}
    except (KeyError, TypeError, IndexError):
        raise DeqirError("DeqirRestorer takes rows with columns bytes and path "
                         "(ray.data.read_binary_files(root, include_paths=True))") from None
    return list(zip(cols["bytes"], cols["path"]))


class _Gang:
    """P ``RestoreWorker`` rank actors in one placement group, joined into one process group."""

    def __init__(self, spec: dict, ranks: int, timeout_s: float):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from deqir_dist.ray.worker import RestoreWorker
        self.ray, self.timeout = ray, timeout_s
        cuda = spec["device"] == "cuda"
        bundle = {"CPU": 1, **({"GPU": 1} if cuda else {})}
        self.pg = placement_group([dict(bundle) for _ in range(ranks)], strategy="STRICT_PACK")
        try:
            ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
            if not ready:
                raise DeqirError(f"could not place a gang of {ranks} x {bundle} on one node within {timeout_s:.0f} s")
            cls = ray.remote(RestoreWorker)
            self.ranks = [cls.options(num_cpus=1, num_gpus=1 if cuda else 0, max_restarts=0,
                                      scheduling_strategy=PlacementGroupSchedulingStrategy(
                                          placement_group=self.pg, placement_group_bundle_index=r)).remote(spec)
                          for r in range(ranks)]
            addr = ray.get(self.ranks[0].address.remote(), timeout=timeout_s)
            ray.get([a.join.remote(addr, r, ranks, "nccl" if cuda else "gloo", timeout_s)
                     for r, a in enumerate(self.ranks)], timeout=timeout_s)
        except Exception:
            self.close()
            raise

    def restore(self, rows, params: dict, sigma_y) -> list[dict]:
        items, bad = [], {}
        for data, path in rows:
            name = Path(str(path)).stem
            if not isinstance(data, (bytes, bytearray, memoryview)):
                bad[name] = f"{path}: the bytes column holds {type(data).__name__}, not bytes"
                continue
            items.append({"id": name, "source": str(path), "suffix": Path(str(path)).suffix, "data": bytes(data),
                          "gt_data": None, "op_params": params, "sigma_y": sigma_y, "config": None})
        t0 = time.perf_counter()
        recs = self.ray.get([a.restore_batch.remote(items) for a in self.ranks])[0] if items else []
        done = {r["id"]: r for r in recs}
        out = []
        for _, path in rows:
            name = Path(str(path)).stem
            r = done.get(name)
            if r is None:
                out.append({"id": name, "status": "error", "error": bad.get(name, "not restored")})
            elif r["status"] == "ok":
                out.append({"id": name, "png": r["png"], "status": "ok", "error": None,
                            "iterations": r["iterations"], "solver": r.get("solver"), "seconds": r["seconds"]})
            else:
                out.append({"id": name, "status": "error", "error": r.get("error"),
                            "seconds": round(time.perf_counter() - t0, 4)})
        return out

    def close(self) -> None:
        ray = self.ray
        for a in getattr(self, "ranks", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        try:
            ray.util.remove_placement_group(self.pg)
        except Exception:  # noqa: BLE001
            pass
