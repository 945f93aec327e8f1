"""``deqir serve --ray``: the same service as a Ray Serve deployment, one gang per replica.

Each replica (:class:`DeqirReplica`) is what the plain server is: the engine (``serve.engine``)
with its executor, and ``serve.app``'s Starlette app as the replica's ASGI ingress, so the API,
the errors and the PNG bytes are the plain server's; the HTTP layer knows nothing of ranks. The
replica owns its gang through the placement group Serve reserves for it (``placement_group_bundles``:
P bundles, STRICT_PACK, so one node; a GPU per bundle on a GPU cluster): the replica is rank 0 in
bundle 0, ranks 1..P-1 are actors in bundles 1..P-1 (``serve.ray_gang``). Serve's proxy listens on
``--host:--port`` and routes each request to a replica; ``/health/ready`` answers for the replica
the request reached, ``/metrics`` for the whole deployment (the replicas' sum through one hub
actor, ``serve.ray_metrics``).

``check_health`` raises while the gang is broken (a rank died: the gang's watcher sees it within a
fraction of a second), so Serve replaces the replica within ``--health-check-period`` seconds; its
rank actors die with it. ``--replicas R`` fixes the count; ``--autoscaling-config JSON`` passes
Ray Serve's ``autoscaling_config`` through instead. SIGTERM / SIGINT: the app is deleted, which
lets every replica finish its in-flight requests (``graceful_shutdown_timeout_s`` = the request
timeout) before it stops its ranks; exit status 0.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path

from deqir_dist.errors import DeqirError, check_int, one_line

RAY_SERVE_HINT = "deqir serve --ray needs Ray Serve: pip install 'deqir-dist[ray-serve]'"
APP_NAME = "deqir"


def ray_serve():
    """``ray.serve``, or the one line saying which extra to install."""
    try:
        from ray import serve
    except ImportError:
        raise DeqirError(RAY_SERVE_HINT) from None
    import ray
    try:
        major, minor = (int(x) for x in ray.__version__.split(".")[:2])
    except ValueError:                      # a development build: assume it is recent
        major, minor = 99, 0
    if (major, minor) < (2, 60):            # a replica's app built in its constructor (__serve_build_asgi_app__)
        raise DeqirError(f"deqir serve --ray needs Ray >= 2.60 (found {ray.__version__}): "
                         "pip install -U 'deqir-dist[ray-serve]'")
    return serve


class DeqirReplica:
    """One replica: the engine, its gang (rank 0 here) and the plain server's ASGI app."""

    def __init__(self, args: argparse.Namespace, max_body: int, engine_and_app):
        """``engine_and_app``: apps.serve.engine_and_app (given, not imported: apps.serve imports
        this module), so the replica's engine and app are built exactly as the plain server's."""
        from deqir_dist.apps.flags import set_threads
        set_threads(args.threads)
        from deqir_dist.serve.ray_metrics import Reporter
        self.args = args
        self.engine, self.asgi = engine_and_app(args, max_body, self._on_broken, metrics_text=self._metrics_text)
        self.reporter = Reporter(self.engine.metrics, f"{socket.gethostname()}:{os.getpid()}")
        self.executor = _executor(args)
        try:
            self.engine.start(self.executor)            # warm-up: every rank, the whole batch path
        except BaseException:
            self.executor.close()
            raise

    def __serve_build_asgi_app__(self):
        return self.asgi

    async def _metrics_text(self) -> str:
        """/metrics: the sum over the deployment's replicas (serve.ray_metrics)."""
        return await self.reporter.text()

    @staticmethod
    def _on_broken(reason: str) -> None:
        print(f"deqir: error: the gang broke ({reason}); Serve's health check replaces this replica",
              file=sys.stderr, flush=True)

    def check_health(self) -> None:
        """Serve's health check: raises when a rank died or a collective failed."""
        why = self.engine.broken or self.executor.health()
        if why is not None:
            if self.engine.broken is None:
                self.engine.mark_broken(why)
            raise RuntimeError(f"the gang broke: {why}")

    def __del__(self):
        if getattr(self, "reporter", None) is not None:
            self.reporter.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout=1.0 if engine.broken else self.args.request_timeout)
        if getattr(self, "executor", None) is not None:
            self.executor.close()


def _executor(args):
    if args.ranks > 1:
        from deqir_dist.serve.ray_gang import RayGangExecutor
        return RayGangExecutor.start(args)
    import ray
    from deqir_dist.models import load_denoiser
    from deqir_dist.serve.executor import InProcessExecutor
    gpu = bool(ray.get_runtime_context().get_accelerator_ids().get("GPU"))
    model = load_denoiser(args.model, checkpoint=args.checkpoint, device="cuda" if gpu else "cpu",
                          emulate_cost=args.emulate_cost)
    return InProcessExecutor(model)


def autoscaling_config(text: str | None) -> dict | None:
    """``--autoscaling-config``: a JSON object (inline or in a file), checked by Ray Serve's own model."""
    if not text:
        return None
    source, path = text, Path(text)
    if not text.lstrip().startswith(("{", "[")) and path.is_file():
        if path.stat().st_size > 1 << 20:
            raise DeqirError(f"--autoscaling-config {text}: over 1 MiB; an autoscaling config is a few lines")
        source = path.read_text(errors="replace")
    try:
        cfg = json.loads(source)
    except json.JSONDecodeError as e:
        raise DeqirError(f"--autoscaling-config is neither a file nor JSON: {e.msg} (line {e.lineno} column "
                         f"{e.colno})") from None
    if not isinstance(cfg, dict):
        raise DeqirError("--autoscaling-config must be a JSON object (Ray Serve's autoscaling_config)")
    ray_serve()
    from ray.serve.config import AutoscalingConfig
    try:
        AutoscalingConfig(**cfg)
    except Exception as e:                  # pydantic's ValidationError, TypeError
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise DeqirError(f"--autoscaling-config: {' '.join(lines[:3])[:300]}") from None
    return cfg


def deployment_options(args, gpus: bool) -> dict:
    """The deployment's options: one placement group of P bundles per replica, Serve's queues
    sized to the engine's (its own bounded queue gives 429 first), health checks, drain time."""
    bundle = {"CPU": float(args.threads or 1), **({"GPU": 1.0} if gpus else {})}
    opts = dict(name=APP_NAME, ray_actor_options={"num_cpus": bundle["CPU"], "num_gpus": bundle.get("GPU", 0)},
                placement_group_bundles=[dict(bundle) for _ in range(args.ranks)],
                placement_group_strategy="STRICT_PACK",
                max_ongoing_requests=args.max_queue + args.max_batch + 8,     # + health and metrics calls
                max_queued_requests=args.max_queue,
                health_check_period_s=args.health_check_period, health_check_timeout_s=max(30.0, args.dist_timeout),
                graceful_shutdown_timeout_s=args.request_timeout, graceful_shutdown_wait_loop_s=0.5)
    auto = autoscaling_config(args.autoscaling_config)
    if auto is not None:
        opts["autoscaling_config"] = auto
    else:
        opts["num_replicas"] = args.replicas or 1
    return opts


def deploy(args, max_body: int, port: int, engine_and_app):
    """Start Serve's proxy on --host:port and run the deployment (returns once every replica is
    warm). Ray must be initialised."""
    serve = ray_serve()
    import ray
    gpus = str(args.device or "").startswith("cuda") or (
        args.device is None and ray.cluster_resources().get("GPU", 0) >= 1)
    opts = deployment_options(args, gpus)
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("func",)})
    replica = serve.deployment(serve.ingress()(DeqirReplica), **opts)
    serve.start(http_options={"host": args.host, "port": port})
    from deqir_dist.serve.ray_metrics import start_hub
    start_hub()                             # the replicas' /metrics sum (serve.ray_metrics)
    try:
        return serve.run(replica.bind(ns, max_body, engine_and_app), name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as e:                  # a replica could not start: its DeqirError's line if it has one
        raise DeqirError(f"the Ray Serve deployment did not start: {_why(serve, e)}") from None


def _why(serve, e: Exception) -> str:
    """The replica's own error (Serve keeps its traceback in the deployment's status message)."""
    text = str(e)
    try:
        text = serve.status().applications[APP_NAME].deployments[APP_NAME].message or text
    except Exception:  # noqa: BLE001
        pass
    m = re.search(r"DeqirError: ([^\n]+)", text)
    if m:
        return m.group(1).strip()[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else one_line(e))[:300]


def _check_fits(args, resources: dict) -> None:
    """The first replicas' placement groups must fit this (fixed-size) Ray."""
    auto = autoscaling_config(args.autoscaling_config)
    replicas = (auto.get("initial_replicas") or auto.get("min_replicas") or 1) if auto else (args.replicas or 1)
    need = replicas * args.ranks * (args.threads or 1)
    have = resources.get("CPU", 0)
    if need > have:
        raise DeqirError(f"{replicas} replica(s) x --ranks {args.ranks} x {args.threads or 1} CPU(s) need {need:g} CPUs; "
                         f"this machine's Ray has {have:g} (fewer replicas or ranks, or --ray-address a cluster)")


def _connect(address: str | None) -> bool:
    """Start a private Ray or join ``address``; True when this call started it."""
    from deqir_dist.ray.cluster import _bound_gcs_wait, _probe_address, _restore_env
    import ray
    if ray.is_initialized():
        return False
    saved = {}
    if address:
        _probe_address(address, 30.0)
        saved = _bound_gcs_wait(30.0)
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)      # Serve's INFO lines: the replicas' logs
    except Exception as e:
        raise DeqirError(f"cannot start or join Ray at {address or 'local'}: {one_line(e, bare_deqir=True)[:300]}") \
            from None
    finally:
        _restore_env(saved)
        if callable(sigterm):               # ray.init replaced it: a SIGTERM while starting unwinds (apps.guard)
            signal.signal(signal.SIGTERM, sigterm)
    return True


def cmd_serve_ray(args, max_body: int, engine_and_app) -> int:
    ray_serve()
    if args.replicas is not None:
        check_int("--replicas", args.replicas)
        if args.autoscaling_config:
            raise DeqirError("give --replicas or --autoscaling-config, not both")
    autoscaling_config(args.autoscaling_config)            # a bad one fails before Ray starts
    hc = args.health_check_period
    if not (hc == hc and 0 < hc < float("inf")):
        raise DeqirError(f"--health-check-period must be a finite number > 0, got {hc}")
    port = args.port
    if port == 0:                           # Serve's proxy takes a fixed port: pick a free one
        from deqir_dist.serve.gang import free_port
        port = free_port(args.host)
    started = _connect(args.ray_address)
    import ray
    from ray import serve
    stop = threading.Event()
    try:
        if started:                         # a private Ray cannot grow: placement that cannot happen would wait forever
            _check_fits(args, ray.cluster_resources())
        deploy(args, max_body, port, engine_and_app)
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving on http://{shown}:{port}", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    finally:
        try:
            serve.delete(APP_NAME)         # replicas drain their in-flight requests, then stop their ranks
        except Exception as e:  # noqa: BLE001
            print(f"deqir: warning: stopping Ray Serve: {one_line(e)[:200]}", file=sys.stderr)
        if started:                         # the private Ray, Serve's controller and proxy with it
            ray.shutdown()
    return 0
