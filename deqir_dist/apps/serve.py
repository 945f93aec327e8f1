"""``deqir serve``: restoration as an HTTP service (serve/: engine, executors, the ASGI app).

Binds 127.0.0.1 unless told otherwise; prints exactly one line, ``serving on http://HOST:PORT``,
once every rank has joined, the model is loaded and a warm-up restore has run (``--port 0``: the
port the system chose). The CLI's sampler, task and limit flags are the server's defaults; a
request's form fields (the same names) override them for that request. SIGTERM stops taking
requests, finishes the queued and running ones and exits 0; a gang that lost a rank answers its
requests 503 and exits 3 for its supervisor to restart it.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading

from deqir_dist.api.budget import time_cap
from deqir_dist.api.planner import load_profile
from deqir_dist.api.restore import check_settings
from deqir_dist.apps.flags import (
    _device,
    add_sampler_flags,
    add_task_flags,
    check_sampler_flags,
    restore_kwargs,
    task_params,
)
from deqir_dist.dataset.tasks import OP_FLAGS, operator_params
from deqir_dist.errors import DeqirError, check_int
from deqir_dist.io.limits import max_file_bytes
from deqir_dist.physics.masks import MASK_KINDS
from deqir_dist.serve.inputs import Settings

EXTRA_HINT = "deqir serve needs the serve extra: pip install 'deqir-dist[serve]'"
# the request fields: the CLI's per-image flags (model, device, caps and profile are the server's)
FIELDS = ("task", "scale", "kernel_size", "blur_sigma", "sigma_h", "sigma_w", "mask", "mask_fraction", "mask_seed",
          "ratio", "cs_seed", "sigma_y", "solver", "steps", "start", "stop", "stop_tol", "max_iter", "warm_start",
          "window", "blocks", "coarse_steps", "clip_x0", "etw", "nw", "seed", "from_clean", "bits")
BOOL_FIELDS = ("from_clean", "clip_x0")
EXIT_GANG_BROKEN = 3


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve restoration over HTTP (POST /v1/restore; needs the [serve] extra)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    g.add_argument("--ranks", type=int, default=1, metavar="P",
                   help="processes in the gang: P - 1 local ranks are spawned, every batch's chain is sharded "
                        "over all P (gloo on CPU, nccl on CUDA; default 1)")
    g.add_argument("--plan", default="auto", choices=("auto", "sharded", "data-parallel"),
                   help="with --ranks P > 1: shard each batch's chains over the gang, deal its images out (each "
                        "rank restores its own), or let the cost model choose per batch (auto, the default)")
    g.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 429 (default 16)")
    g.add_argument("--max-batch", type=int, default=4,
                   help="compatible requests restored in one call (default 4; 1: no batching)")
    g.add_argument("--slo-ms", type=float,
                   help="cap each batch so its modelled latency (api.planner's cost model, the layout that would "
                        "run it) fits this many milliseconds (default: no cap below --max-batch)")
    g.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="an idle server waits this long for company before it starts a batch (default 2)")
    g.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds a request may take, queue included, before it gets 504 (default 120)")
    g.add_argument("--max-body-bytes", type=int,
                   help="largest request body (default: two input files at the byte cap + 64 KiB)")
    g.add_argument("--dist-timeout", type=float, default=30.0,
                   help="seconds any collective may wait before the gang gives up (default 30)")
    g.add_argument("--backend", choices=("gloo", "nccl"), help="default: nccl on CUDA, gloo on CPU")
    g.add_argument("--threads", type=int, help="torch CPU threads per rank (default: torch's choice)")
    g.add_argument("--bits", type=int, default=8, choices=(8, 16), help="PNG bit depth of the replies (default 8)")
    g.add_argument("--from-clean", action="store_true",
                   help="default for the from_clean field: uploads are clean images, degraded here")
    g.add_argument("--max-time", metavar="MINUTES",
                   help="the work cap per request (api.budget): an upload whose restore is modelled, from its "
                        "header, to take longer is refused in one line; minutes, or 90m, 3h (default 180; 0: none)")
    g.add_argument("--emulate-cost", metavar="TABLE.json",
                   help="hold every denoiser call to the table's c(b) (models.emulated; benchmarks)")
    r = p.add_argument_group("Ray Serve (--ray; needs the ray-serve extra)")
    r.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: R replicas (or autoscaled), each owning a gang of --ranks P in its "
                        "own placement group (STRICT_PACK: one node); Serve's proxy listens on --host:--port")
    r.add_argument("--replicas", type=int, metavar="R", help="replicas of the deployment (default 1)")
    r.add_argument("--autoscaling-config", metavar="JSON",
                   help="Ray Serve's autoscaling_config, passed through (a JSON object or a file holding one, "
                        "e.g. '{\"min_replicas\": 1, \"max_replicas\": 4, \"target_ongoing_requests\": 4}'); "
                        "instead of --replicas")
    r.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to join (host:port of its GCS; default: a private local Ray)")
    r.add_argument("--health-check-period", type=float, default=2.0, metavar="S",
                   help="seconds between Serve's health checks of a replica (its gang); default 2")
    add_task_flags(p, task_required=False)
    add_sampler_flags(p)


def _request_parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise DeqirError(message.replace("argument --", "field "))
    p = Parser(prog="POST /v1/restore", add_help=False, exit_on_error=False)
    add_task_flags(p, task_required=False)
    add_sampler_flags(p)
    p.add_argument("--bits", type=int, choices=(8, 16))
    p.add_argument("--from-clean", action="store_true")
    p.add_argument("--no-from-clean", dest="from_clean", action="store_false")
    return p


def _truth(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise DeqirError(f"field {name} takes true or false, got {value[:40]!r}")


def field_parser(defaults: argparse.Namespace):
    """fields (form field -> text), mask_path -> serve.inputs.Settings, the CLI's checks applied."""
    parser = _request_parser()

    def parse(fields: dict, mask_path: str | None) -> Settings:
        argv = []
        for raw, value in fields.items():
            name = raw.replace("-", "_")
            if name not in FIELDS:
                raise DeqirError(f"unknown field {raw[:40]!r}; the fields are deqir restore's flags: "
                                 f"{', '.join(FIELDS)}")
            if name in BOOL_FIELDS:
                flag = name.replace("_", "-")
                argv.append(f"--{flag}" if _truth(name, value) else f"--no-{flag}")
            elif name == "mask" and value not in MASK_KINDS:     # never a path on the server's disk
                raise DeqirError(f"field mask takes {', '.join(MASK_KINDS)}; send a mask image as the file field "
                                 "'mask'")
            else:
                argv.append(f"--{name.replace('_', '-')}={value}")
        if mask_path is not None:
            if "mask" in fields:
                raise DeqirError("give the mask as a file field or as a form field, not both")
            argv.append(f"--mask={mask_path}")
        ns = argparse.Namespace(**vars(defaults))
        ns.threads = None
        try:
            ns = parser.parse_args(argv, namespace=ns)
        except argparse.ArgumentError as e:
            raise DeqirError(str(e).replace("argument --", "field ")) from None
        check_sampler_flags(ns)
        kw = restore_kwargs(ns)
        check_settings(**kw)
        if getattr(defaults, "max_time", None) is not None:     # the server's cap; no request field sets it
            kw["max_time"] = defaults.max_time
        flags = {f: getattr(ns, f, None) for f in OP_FLAGS}
        return Settings(ns.task, task_params(ns) if ns.task else None, lambda t: operator_params(t, flags), kw,
                        ns.seed, bool(ns.from_clean), ns.bits)
    return parse


class _Server:
    """uvicorn's Server whose SIGTERM / SIGINT only ask it to stop (drain); never re-raised."""

    def __init__(self, app, sock, limit_concurrency: int):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                def stop(*_):
                    self.should_exit = True
                old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
                try:
                    yield
                finally:
                    for s, h in old.items():
                        signal.signal(s, h)
        self.server = Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False,
                                                   limit_concurrency=limit_concurrency))
        self.sock = sock

    async def run(self, line: str, ready) -> None:
        """Serve; print ``line`` once the server listens and ``ready()`` (the engine warmed up)."""
        task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        while not (self.server.started and ready()) and not task.done() and not self.server.should_exit:
            await asyncio.sleep(0.01)
        if self.server.started and ready() and not self.server.should_exit:
            print(line, flush=True)
        await task

    def stop(self) -> None:
        self.server.should_exit = True


def _importable(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cmd_serve(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DeqirError(EXTRA_HINT) from None
    if not any(_importable(m) for m in ("python_multipart", "multipart")):    # starlette's form parser
        raise DeqirError(EXTRA_HINT)
    check_sampler_flags(args)
    check_int("--ranks", args.ranks)
    check_int("--max-queue", args.max_queue)
    check_int("--max-batch", args.max_batch)
    if not 0 <= args.port <= 65535:
        raise DeqirError(f"--port must be 0..65535, got {args.port}")
    positive = ("request_timeout", "dist_timeout") + (("slo_ms",) if args.slo_ms is not None else ())
    for flag in positive + ("batch_wait_ms",):
        v = getattr(args, flag)
        if not (v == v and 0 <= v < float("inf")) or (flag != "batch_wait_ms" and v <= 0):
            bound = ">= 0" if flag == "batch_wait_ms" else "> 0"
            raise DeqirError(f"--{flag.replace('_', '-')} must be a finite number {bound}, got {v}")
    check_settings(**restore_kwargs(args))
    time_cap(args.max_time)
    if args.profile:
        load_profile(args.profile)
    max_body = args.max_body_bytes or 2 * max_file_bytes() + 64 * 1024
    check_int("--max-body-bytes", max_body)
    from deqir_dist.serve.torchrun import under_torchrun
    if args.ray:                            # Ray Serve: replicas, each with its gang (apps.serve_ray)
        if under_torchrun():
            raise DeqirError("--ray places each replica's gang with Ray; run it without torchrun")
        from deqir_dist.apps.serve_ray import cmd_serve_ray
        return cmd_serve_ray(args, max_body, engine_and_app)
    if args.replicas is not None or args.autoscaling_config or args.ray_address:
        raise DeqirError("--replicas, --autoscaling-config and --ray-address belong to --ray")
    if under_torchrun():                    # rank 0 serves, the others follow (serve.torchrun)
        code = _torchrun_join(args)
        if code is not None:
            return code
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise DeqirError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    sock.listen(128)
    host, port = sock.getsockname()[:2]
    broken, failed, held = [], [], {}
    server = None

    def on_broken(reason: str) -> None:
        broken.append(reason)
        print(f"deqir: error: the gang broke ({reason}); exiting for a restart", file=sys.stderr, flush=True)
        if server is not None:
            server.stop()
    engine, app = engine_and_app(args, max_body, on_broken)
    # connections beyond the queue, the batch and a margin for health checks get 503 from uvicorn
    server = _Server(app, sock, args.max_queue + args.max_batch + 32)

    def boot() -> None:
        """Load the model, join the ranks, warm up; meanwhile /health/live answers, /health/ready is 503."""
        try:
            held["executor"] = _executor(args)
            engine.start(held["executor"])      # warm-up: every rank, the whole batch path
        except BaseException as e:
            failed.append(e)
            server.stop()
    booter = threading.Thread(target=boot, name="deqir-boot", daemon=True)
    shown = f"[{host}]" if ":" in host else host
    try:
        booter.start()
        asyncio.run(server.run(f"serving on http://{shown}:{port}", lambda: engine.ready))
    finally:
        booter.join()                           # a stop during start-up: the ranks are up before they are stopped
        engine.close(timeout=None if engine.broken is None else 1.0)
        if "executor" in held:
            held["executor"].close()
        sock.close()
    if broken or engine.broken:
        # the engine's thread may still sit in a collective with a dead rank: do not wait for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_GANG_BROKEN)
    if failed:
        raise failed[0]
    return 0


def engine_and_app(args, max_body: int, on_broken, metrics_text=None):
    """The engine (executor given at start) and its Starlette app, as the plain server and every
    Ray Serve replica (apps.serve_ray) run them (``metrics_text``: serve.app.build_app's)."""
    from deqir_dist.serve.app import build_app
    from deqir_dist.serve.engine import Engine
    from deqir_dist.serve.metrics import Metrics
    name = args.checkpoint or args.model or ("analytic" if args.emulate_cost else "builtin")
    engine = Engine(None, Metrics(), max_queue=args.max_queue, max_batch=args.max_batch,
                    batch_wait_s=args.batch_wait_ms / 1e3, on_broken=on_broken,
                    batch_cap=_slo_cap(lambda: engine.executor, args) if args.slo_ms is not None else None)
    app = build_app(engine, field_parser(args), lambda: engine.executor.model, name, max_body, args.request_timeout,
                    metrics_text=metrics_text)
    return engine, app


def _slo_cap(executor_of, args):
    """(Prepared, max_batch) -> the largest batch of its key whose modelled latency fits --slo-ms."""
    from deqir_dist.serve.batch import Batch
    from deqir_dist.serve.plan import slo_batch_cap

    def cap(prepared, max_batch: int) -> int:
        it = prepared.item
        batch = Batch([it.name], [prepared.seed], it.y, it.op, prepared.kw)
        executor = executor_of()
        return slo_batch_cap(executor.model, batch, executor.procs, max_batch, args.slo_ms,
                             getattr(args, "plan", "auto"))
    return cap


def _torchrun_join(args) -> int | None:
    """Join torchrun's group; a follower rank runs here until rank 0 stops it (its exit status)."""
    import torch.distributed as dist
    from deqir_dist.models import load_denoiser
    from deqir_dist.serve.torchrun import run_follower, torch_device_for
    args.torchrun_device = torch_device_for(args)
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.ranks not in (1, world):
        raise DeqirError(f"under torchrun the gang is its {world} processes: drop --ranks {args.ranks}")
    args.ranks = world
    if rank == 0:
        return None
    model = load_denoiser(args.model, checkpoint=args.checkpoint, device=args.torchrun_device,
                          emulate_cost=args.emulate_cost)
    return run_follower(model, rank)


def _executor(args):
    from deqir_dist.models import load_denoiser
    if getattr(args, "torchrun_device", None) is not None:
        from deqir_dist.serve.torchrun import TorchrunExecutor
        model = load_denoiser(args.model, checkpoint=args.checkpoint, device=args.torchrun_device,
                              emulate_cost=args.emulate_cost)
        return TorchrunExecutor.start(args, model, args.torchrun_device)
    if args.ranks > 1:
        from deqir_dist.serve.gang import LocalGangExecutor
        return LocalGangExecutor.start(args)
    from deqir_dist.serve.executor import InProcessExecutor
    model = load_denoiser(args.model, checkpoint=args.checkpoint, device=_device(args),
                          emulate_cost=args.emulate_cost)
    return InProcessExecutor(model)
