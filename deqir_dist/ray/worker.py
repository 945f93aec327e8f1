"""The Ray actor that restores batches of images (one process, or one rank of a gang)."""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

from deqir_dist.api.budget import input_check
from deqir_dist.api.profile_cache import plan_record
from deqir_dist.api.restore import plan_auto, restore
from deqir_dist.dataset.items import generator_for, keep_gray, load_items, metrics
from deqir_dist.dataset.results import _canonical
from deqir_dist.errors import DeqirError, one_line
from deqir_dist.io.images import read_image, write_image
from deqir_dist.io.limits import set_decode_limits
from deqir_dist.models import load_denoiser
from deqir_dist.models.settings import SAMPLER_KEYS, resolve_settings
from deqir_dist.physics.padded import PaddedOperator
from deqir_dist.sampling.noise import draw_noise

TEST_ENV_PREFIX = "DEQIR_TEST_"


# ============================================================================ the worker


class _GangBroken(RuntimeError):
    """A collective failed inside a gang: the driver replaces the whole gang."""


class RestoreWorker:
    """One worker process (a Ray actor; also usable in-process): holds the model, restores batches.

    ``spec``: model, checkpoint, device ("cpu" | "cuda"), threads, task, restore (sampler keyword
    arguments without sigma_y), seed, from_clean, bits, batch (restore equal operators together),
    token (the job's id). ``restore_batch(items)`` returns one record per item, with the encoded
    PNG under ``png`` for restored images.
    """

    def __init__(self, spec: dict):
        import torch
        torch.set_num_threads(max(1, int(spec.get("threads", 1))))
        self.spec = dict(spec)
        if spec.get("limits"):                 # the driver's decode caps (--max-pixels)
            set_decode_limits(**spec["limits"])
        self.device = torch.device("cuda", 0) if spec.get("device") == "cuda" else torch.device("cpu")
        self.model = load_denoiser(spec["model"], checkpoint=spec.get("checkpoint"), device=self.device)
        self.scratch = Path(tempfile.gettempdir())   # a per-batch temp folder while restoring
        self.rank, self.world = 0, 1
        self.images_done = 0
        # test-only fault injection (see the module docstring)
        k = os.environ.get(TEST_ENV_PREFIX + "WORKER_EXIT_AFTER")
        self._exit_after = int(k) if k and k.strip().isdigit() and int(k) > 0 else None
        self._exit_marker = os.environ.get(TEST_ENV_PREFIX + "WORKER_EXIT_MARKER") or os.path.join(
            tempfile.gettempdir(), f"deqir-test-worker-exit-{spec.get('token', 'job')}")

    # ---------------------------------------------------------------- gang set-up
    def ready(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(self.device)}

    def address(self) -> str:
        """``tcp://IP:PORT`` on this node with a free port (rank 0 of a gang)."""
        try:
            import ray
            ip = ray.util.get_node_ip_address()
        except Exception:
            ip = "127.0.0.1"
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def join(self, init_method: str, rank: int, world: int, backend: str, timeout_s: float) -> int:
        """Join the gang's process group (every rank calls this at the same time)."""
        from datetime import timedelta

        import torch.distributed as dist
        if self.device.type == "cuda":
            import torch
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = rank, world
        return rank

    # ---------------------------------------------------------------- restoring
    def _maybe_test_exit(self) -> None:
        if self._exit_after is None or self.images_done < self._exit_after:
            return
        try:
            fd = os.open(self._exit_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except OSError:
            self._exit_after = None            # it happened already (marker exists)
            return
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        os._exit(17)

    def _load(self, it: dict):
        """Decode and validate one shipped input: an ``Item`` (jobs.load_items) with ground truth."""
        # the file keeps the id as its stem: load_items draws the measurement noise from (seed, stem)
        tmp = self.scratch / "in" / f"{it['id']}{it['suffix']}"
        tmp.parent.mkdir(exist_ok=True)
        gtmp = None
        try:
            tmp.write_bytes(it["data"])
            try:        # the restore's memory and work estimated from the header, before decoding
                item = load_items([tmp], self.spec["task"], it["op_params"], self.spec["from_clean"],
                                  sigma_y=it["sigma_y"], seed=self.spec["seed"], check=self._budget_check())[0]
            except DeqirError as e:
                raise type(e)(str(e).replace(str(tmp), it["source"])) from None
            item.source = Path(it["source"])
            if it.get("gt_data") is not None:
                gtmp = self.scratch / "gt" / f"{it['id']}{it['gt_suffix']}"
                gtmp.parent.mkdir(exist_ok=True)
                gtmp.write_bytes(it["gt_data"])
                try:
                    gt = read_image(gtmp, channels=3)
                except DeqirError as e:
                    raise type(e)(str(e).replace(str(gtmp), it["gt_source"])) from None
                if tuple(gt.shape) != tuple(item.op.image_shape):
                    raise DeqirError(f"ground truth {it['gt_source']} is {tuple(gt.shape)}, but the restored "
                                     f"image is {tuple(item.op.image_shape)}")
                item.gt = gt[None]
            return item
        finally:
            for f in (tmp, gtmp):
                if f is not None:
                    try:
                        f.unlink()
                    except OSError:
                        pass

    def _budget_check(self):
        """``api.budget.input_check`` with this job's sampler settings (``max_time``: the work cap)."""
        if getattr(self, "_check", None) is None:
            kw = self.spec["restore"]
            self._check = input_check(self.model, self.spec["task"], kw.get("steps"), kw.get("solver", "auto"), kw,
                                      max_time=kw.get("max_time"))
        return self._check

    def _encode(self, name: str, image) -> bytes:
        path = self.scratch / f"{uuid.uuid4().hex[:8]}-{name}.png"
        try:
            write_image(path, image, bits=self.spec.get("bits", 8))
            return path.read_bytes()
        finally:
            try:
                path.unlink()
            except OSError:
                pass

    def _restore_group(self, group: list) -> list:
        """One ``restore`` call over items that share an operator; per image (record, png)."""
        import torch

        kw = dict(self.spec["restore"])
        op = group[0][1].op
        # the sampler settings restore would resolve (the model card's where none is given), and the
        # canvas it samples on (padded to the model's size multiple), so the noise draws fit
        settings, sources = resolve_settings(self.model, op.name, kw)
        kw.update({k: settings[k] for k in SAMPLER_KEYS})     # the schedule is the model's (settings records it)
        sigma_y, sources["sigma_y"] = group[0][0]["sigma_y"], "user"
        if sigma_y is None:                 # not given: from the file's bit depth (jobs.load_items)
            sigma_y, sources["sigma_y"] = group[0][1].sigma_y, group[0][1].sigma_y_source
        sampler = {"settings": {**settings, "sigma_y": sigma_y}, "source": sources}
        canvas = PaddedOperator.to_multiple(op, getattr(self.model, "size_multiple", 1)).image_shape
        xis, zs = [], []
        for it, item in group:
            xi, z = draw_noise(1, canvas, kw["steps"], kw.get("nw", 0.0),
                               generator_for(self.spec["seed"], it["id"]))
            xis.append(xi)
            zs.append(z)
        y = torch.cat([item.y for _, item in group])
        t0 = time.perf_counter()
        res = restore(self.model, y, op, noise=torch.cat(xis), step_noise=None if zs[0] is None else torch.cat(zs),
                      sigma_y=sigma_y, distributed=self.world > 1, **kw)
        sec = (time.perf_counter() - t0) / len(group)
        out = []
        for j, (it, item) in enumerate(group):
            img = keep_gray(item.gt if item.gt is not None else item.y, res.image[j:j + 1].float().cpu())
            rec = {"iterations": int(res.iterations_per_image[j]), "seconds": round(sec, 4), **plan_record(res),
                   "ranks": self.world, "sampler": sampler}
            if item.gt is not None:
                rec.update(metrics(img, item.gt, it["id"]))
            out.append((rec, self._encode(it["id"], img[0])))
        return out

    # ---------------------------------------------------------------- solver="auto", once per job
    def plan_auto(self, items: list[dict]) -> dict | None:
        """What ``restore(solver="auto")`` chooses on this worker (``self.world`` ranks) for the first
        of ``items`` that loads: its plan (``api.restore.plan_auto``: from the spec's profile, or c(b)
        timed here on its padded size), with ``image`` and ``image_shape``; None if none loads."""
        kw = self.spec["restore"]
        with tempfile.TemporaryDirectory(prefix="deqir-ray-") as scratch:
            self.scratch = Path(scratch)
            for it in items:
                try:
                    item = self._load(it)
                except Exception:
                    continue                  # it fails again, and is recorded, when its batch runs
                settings, _ = resolve_settings(self.model, item.op.name, kw)
                choice, plan = plan_auto(self.model, item.op, self.world, kw.get("profile"), settings["steps"],
                                         settings["etw"], kw.get("stop", "rows"), kw.get("max_iter"),
                                         "window" in kw)
                canvas = PaddedOperator.to_multiple(item.op, getattr(self.model, "size_multiple", 1))
                return {**plan, "image": it["id"], "image_shape": list(canvas.image_shape)}
        return None

    def set_profile(self, c_ms: dict) -> None:
        """Plan every later restore from this c(b) table (the driver's one measurement)."""
        self.spec["restore"] = {**self.spec["restore"], "profile": dict(c_ms)}

    def restore_batch(self, items: list[dict]) -> list[dict]:
        """Restore a batch; one record per item, in order (``status`` ok with ``png`` bytes, or failed)."""
        with tempfile.TemporaryDirectory(prefix="deqir-ray-") as scratch:
            self.scratch = Path(scratch)
            return self._restore_batch(items)

    def _restore_batch(self, items: list[dict]) -> list[dict]:
        records: dict[str, dict] = {}
        loaded = []
        for it in items:
            base = {"id": it["id"], "input": it["source"], "config": it["config"]}
            try:
                loaded.append((it, self._load(it)))
            except Exception as e:
                records[it["id"]] = {**base, "status": "failed", "error": one_line(e, bare_deqir=True)}
        groups: dict = {}
        for it, item in loaded:
            key = (json.dumps(_canonical(item.op.describe()), sort_keys=True, default=str),
                   it["sigma_y"] if it["sigma_y"] is not None else item.sigma_y)
            if not self.spec.get("batch"):
                key = (key, it["id"])
            groups.setdefault(key, []).append((it, item))
        for group in groups.values():
            try:
                results = self._restore_group(group)
            except Exception as e:
                self._raise_if_gang_broken(e)
                if len(group) > 1:               # isolate the failing image(s)
                    results = []
                    for one in group:
                        try:
                            results.extend(self._restore_group([one]))
                        except Exception as e1:
                            self._raise_if_gang_broken(e1)
                            results.append(({"error": one_line(e1, bare_deqir=True)}, None))
                else:
                    results = [({"error": one_line(e, bare_deqir=True)}, None)]
            for (it, _), (rec, png) in zip(group, results):
                base = {"id": it["id"], "input": it["source"], "config": it["config"]}
                if png is None:
                    records[it["id"]] = {**base, "status": "failed", **rec}
                else:
                    records[it["id"]] = {**base, "status": "ok", "error": None, **rec, "png": png}
                self.images_done += 1
                self._maybe_test_exit()
        return [records[it["id"]] for it in items]

    def _raise_if_gang_broken(self, e: Exception) -> None:
        if self.world > 1 and (not isinstance(e, DeqirError) or "collective" in str(e)):
            raise _GangBroken(f"rank {self.rank}: {one_line(e, bare_deqir=True)}") from e
