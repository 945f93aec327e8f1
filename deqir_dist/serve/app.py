"""The HTTP layer (Starlette, an ASGI app for uvicorn): multipart in, PNG (or JSON) out, health
and metrics. It knows nothing of ranks: it checks a request, hands it to the engine and waits.

``POST /v1/restore`` (multipart/form-data): file ``image`` (a measurement PNG as ``deqir
degrade`` writes it, a plain picture with ``from_clean=true``, or a .pt measurement), optional
file ``mask`` (an inpainting mask image), and form fields named as the CLI's flags. The reply
is the PNG ``deqir restore`` writes for that file, flags and seed, with ``X-Request-Id``,
``X-Deqir-Solver``, ``X-Deqir-Plan``, ``X-Deqir-Iterations``, ``X-Deqir-Queue-Ms``,
``X-Deqir-Solve-Ms``; with ``Accept: application/json`` the same as JSON (PNG in base64).

Errors are JSON ``{"error": "<one line>"}``: 400 (the DeqirError's line), 413 (a body over
``max_body_bytes``, refused from its Content-Length or as it streams in; a picture over the
pixel or byte caps, from its header, before decoding; a restore over the memory or work cap,
before any work: ``errors.TooLarge``), 415 (not multipart), 429 + Retry-After
(queue full), 503 (not ready; the gang broke), 504 (the deadline passed).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from deqir_dist.errors import DeqirError, TooLarge, one_line
from deqir_dist.serve.engine import Engine, ServeError
from deqir_dist.serve.inputs import prepare, upload_name

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route
except ImportError:          # pragma: no cover - apps.serve says which extra to install
    Starlette = None

MAX_FIELDS = 64
PREPARE_SLOTS = 2
MAX_FIELD_BYTES = 64 * 1024
COPY_CHUNK = 1 << 20


class _BodyTooLarge(Exception):
    pass


def error(status: int, message: str, headers: dict | None = None, request_id: str | None = None) -> "JSONResponse":
    h = dict(headers or {})
    if request_id:
        h["X-Request-Id"] = request_id
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=h)


def cap_status(e: DeqirError) -> int:
    """413 for a request over a cap (``errors.TooLarge``: pixels, bytes, memory, modelled work),
    400 for every other bad input."""
    return 413 if isinstance(e, TooLarge) else 400


def build_app(engine: Engine, parse_fields, model_of, model_name: str, max_body_bytes: int,
              request_timeout_s: float, scratch: str | None = None, metrics_text=None):
    """The Starlette app. ``parse_fields(fields: dict[str, str], mask_path: str | None)`` ->
    ``serve.inputs.Settings`` (the CLI's flags; apps.serve); DeqirError for a bad one.
    ``model_of()``: the loaded model (asked only once the engine is ready). ``metrics_text``: an
    async callable answering ``/metrics`` (a Ray Serve replica's: the deployment's sum,
    ``serve.ray_metrics``); default this server's own numbers."""
    if Starlette is None:
        raise DeqirError("deqir serve needs the serve extra: pip install 'deqir-dist[serve]'")
    metrics = engine.metrics
    slots = {}                 # decoding is bounded: at most PREPARE_SLOTS uploads decoded at once
    masks = Path(tempfile.mkdtemp(prefix="deqir-serve-masks-", dir=scratch))

    async def restore(request: Request):
        t0 = time.monotonic()
        if engine.broken is not None or not engine.ready:
            metrics.inc("deqir_requests_total", outcome="not_ready")
            why = f"the gang broke: {engine.broken}" if engine.broken else "the server is not ready"
            return error(503, why, {"Retry-After": "1"})
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            metrics.inc("deqir_requests_total", outcome="bad_request")
            return error(415, "POST /v1/restore takes multipart/form-data (file field 'image', form fields named "
                              "as deqir restore's flags)")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            metrics.inc("deqir_requests_total", outcome="too_large")
            return error(413, f"the request body of {length} bytes is over the cap of {max_body_bytes} bytes "
                              "(--max-body-bytes)", {"Connection": "close"})
        received = 0
        disconnected = asyncio.Event()

        async def counted():
            nonlocal received
            msg = await request.receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > max_body_bytes:
                    raise _BodyTooLarge()
            elif msg["type"] == "http.disconnect":
                disconnected.set()
            return msg

        req = Request(request.scope, receive=counted)
        work = Path(tempfile.mkdtemp(prefix="deqir-serve-", dir=scratch))
        try:
            try:
                form = await req.form(max_files=2, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES)
            except _BodyTooLarge:
                metrics.inc("deqir_requests_total", outcome="too_large")
                return error(413, f"the request body is over the cap of {max_body_bytes} bytes (--max-body-bytes)",
                             {"Connection": "close"})
            except Exception as e:           # malformed multipart (starlette's MultiPartException ...)
                metrics.inc("deqir_requests_total", outcome="bad_request")
                return error(400, f"malformed multipart body: {one_line(e, bare_deqir=True)}")
            sem = slots.setdefault("sem", asyncio.Semaphore(PREPARE_SLOTS))
            try:
                async with sem:
                    prepared = await run_in_threadpool(_prepare, form, work, masks, parse_fields, model_of(),
                                                       model_name)
            except DeqirError as e:
                status = cap_status(e)
                metrics.inc("deqir_requests_total", outcome="too_large" if status == 413 else "bad_request")
                return error(status, one_line(e, bare_deqir=True))
            except Exception as e:           # a bug: one line, and the server carries on
                metrics.inc("deqir_requests_total", outcome="error")
                return error(500, f"internal error: {one_line(e)}")
            finally:
                await form.close()
            try:
                job = engine.submit(prepared, request_timeout_s - (time.monotonic() - t0))
            except ServeError as e:
                metrics.inc("deqir_requests_total", outcome=e.outcome)
                headers = {"Retry-After": str(int(e.retry_after))} if e.retry_after else None
                return error(e.status, str(e), headers)
            try:
                result = await _wait(job, engine, request.receive, disconnected)
            except ServeError as e:
                metrics.inc("deqir_requests_total", outcome=e.outcome)
                headers = {"Retry-After": str(int(e.retry_after or 1))} if e.status == 503 else None
                return error(e.status, str(e), headers, job.id)
            total = time.monotonic() - t0
            metrics.inc("deqir_requests_total", outcome="ok")
            metrics.observe("deqir_request_seconds", result.queue_s, phase="queue")
            metrics.observe("deqir_request_seconds", result.solve_s, phase="solve")
            metrics.observe("deqir_request_seconds", total, phase="total")
            return _reply(request, job, prepared, result, total)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def live(request):
        return JSONResponse({"status": "live"})

    async def ready(request):
        if engine.executor is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        why = engine.broken or engine.executor.health()
        if why is not None and engine.broken is None and engine.ready:
            engine.mark_broken(why)
        if engine.broken is not None:
            return JSONResponse({"status": "broken", "error": engine.broken}, status_code=503)
        if not engine.ready:
            return JSONResponse({"status": "not ready"}, status_code=503)
        pids = engine.executor.pids() if hasattr(engine.executor, "pids") else [os.getpid()]
        return JSONResponse({"status": "ready", "ranks": engine.executor.procs, "pids": pids,
                             "queue_depth": engine.queue_depth()})

    async def metrics_endpoint(request):
        text = await metrics_text() if metrics_text is not None else metrics.render()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    app = Starlette(routes=[Route("/v1/restore", restore, methods=["POST"]),
                            Route("/health/live", live), Route("/health/ready", ready),
                            Route("/metrics", metrics_endpoint)],
                    lifespan=_cleanup(masks))
    return app


def _cleanup(folder: Path):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return lifespan


def _store(upload, path: Path, cap: int) -> None:
    """Copy an upload (spooled by the multipart parser) to ``path``, at most ``cap`` bytes."""
    upload.file.seek(0)
    total = 0
    with open(path, "wb") as f:
        while True:
            chunk = upload.file.read(COPY_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > cap:
                raise TooLarge(f"upload {path.name} is over the cap of {cap} bytes")
            f.write(chunk)


def _prepare(form, work: Path, masks: Path, parse_fields, model, model_name):
    from deqir_dist.io.limits import max_file_bytes
    image = form.get("image")
    if image is None or isinstance(image, str):
        raise DeqirError("POST /v1/restore needs a file field 'image' (e.g. curl -F image=@measurement.png)")
    fields, mask_path = {}, None
    for k, v in form.multi_items():
        if k == "image":
            continue
        if k == "mask" and not isinstance(v, str):      # a mask image: stored by its content
            tmp = work / "mask.upload"
            _store(v, tmp, max_file_bytes())
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:32]
            suffix = Path(upload_name(v.filename or "mask.png")).suffix.lower()
            mask_path = masks / f"{digest}{suffix}"
            if not mask_path.exists():
                shutil.move(str(tmp), mask_path)
            continue
        if not isinstance(v, str):
            raise DeqirError(f"form field {k!r} is a file; only 'image' and 'mask' are files")
        if k in fields:
            raise DeqirError(f"form field {k!r} is given twice")
        fields[k] = v
    name = upload_name(image.filename)
    path = work / name
    _store(image, path, max_file_bytes())
    settings = parse_fields(fields, str(mask_path) if mask_path else None)
    return prepare(path, settings, model, model_name)


async def _wait(job, engine: Engine, receive, disconnected: asyncio.Event):
    """The job's result; the client leaving cancels it, the deadline gives 504."""
    from deqir_dist.serve.engine import Cancelled, DeadlineExceeded

    async def watch():
        while not disconnected.is_set():
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
    fut = asyncio.wrap_future(job.future)
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())     # retrieved: no "never retrieved" log
    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({fut, watcher}, timeout=max(job.deadline - time.monotonic(), 0),
                                     return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result()
        engine.cancel(job)
        if watcher in done:
            raise Cancelled("the client disconnected")
        raise DeadlineExceeded("the request's deadline passed (--request-timeout)")
    finally:
        watcher.cancel()


def _reply(request, job, prepared, result, total_s: float):
    rec = result.record
    headers = {"X-Request-Id": job.id, "X-Deqir-Solver": str(rec.get("solver", "")),
               "X-Deqir-Plan": result.plan, "X-Deqir-Iterations": str(rec["iterations"]),
               "X-Deqir-Queue-Ms": f"{result.queue_s * 1e3:.1f}", "X-Deqir-Solve-Ms": f"{result.solve_s * 1e3:.1f}",
               "X-Deqir-Batch-Size": str(result.batch_size)}
    if "application/json" in request.headers.get("accept", ""):
        source = dict(result.settings_source)
        if not prepared.sigma_y_given:
            source["sigma_y"] = prepared.item.sigma_y_source
        body = {"id": prepared.item.name, "request_id": job.id, "format": "png",
                "image_b64": base64.b64encode(result.png).decode(), "shape": list(prepared.item.op.image_shape),
                "task": prepared.task, "seed": prepared.seed, "bits": prepared.bits, **rec,
                "gang_plan": result.plan, "batch_size": result.batch_size,
                "settings": result.settings, "settings_source": source,
                "timings": {"queue_ms": round(result.queue_s * 1e3, 2), "solve_ms": round(result.solve_s * 1e3, 2),
                            "total_ms": round(total_s * 1e3, 2)}}
        return JSONResponse(_finite(body), headers=headers)
    return Response(result.png, media_type="image/png", headers=headers)


def _finite(v):
    """JSON has no inf or NaN (a PSNR of a perfect restoration): null instead, as io.jsonio writes."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
