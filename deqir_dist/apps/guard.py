"""What every command runs inside: the decode caps of ``--max-pixels`` (io.limits), SIGTERM as a
clean stop, and, for the commands that write an output folder (degrade, restore, ray-restore),
that folder's lock for the whole command (io.outdir.OutputFolder: a second job on the same
folder fails at once, naming the holder; a folder the command created is removed again if it
fails).

The SIGTERM handler is installed first thing in ``cli.main`` (:func:`sigterm_unwinds`, before the
flags are parsed) and kept until ``main`` returns, so a job that has started anything (a lock,
an output, Ray) always has it; only during Python's start-up (the imports, before ``main``)
does SIGTERM end the process the default way, when nothing has been opened.

SIGTERM (``kill``, a scheduler's time limit, torchrun stopping the other ranks after one died)
unwinds the command like an error: staged outputs are dropped, the lock is released and the
folders it created are removed; one line goes to stderr and the exit status is 143.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading

from deqir_dist.io.limits import decode_limits
from deqir_dist.io.outdir import OutputFolder

LOCKED_COMMANDS = ("degrade", "restore", "ray-restore")


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in one line (``deqir: error: ...; see deqir restore --help``), not
    the usage block above it; exit status 2 as before."""

    def error(self, message):
        message = " ".join(str(message).split())
        sys.stderr.write(f"deqir: error: {message}; see {self.prog} --help\n")
        raise SystemExit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every ``with`` and ``finally`` runs."""


def _on_sigterm(signum, frame):
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        rank = os.environ.get("RANK", "?")
        raise Terminated(f"rank {rank} stopped by SIGTERM: torchrun stops every rank when one fails; its "
                         "report below names the failed rank")
    raise Terminated("stopped by SIGTERM")


@contextlib.contextmanager
def sigterm_unwinds():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def job_guard(args):
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(sigterm_unwinds())
            stack.enter_context(decode_limits(max_pixels=getattr(args, "max_pixels", None)))
            out = getattr(args, "out", None)
            # under torchrun only rank 0 writes, so only rank 0 holds the lock
            writer = not getattr(args, "distributed", False) or os.environ.get("RANK", "0") == "0"
            if args.command in LOCKED_COMMANDS and out and writer:
                stack.enter_context(OutputFolder(out, command=f"deqir {args.command}"))
            yield
    except Terminated as e:
        print(f"deqir: error: {e}", file=sys.stderr)
        raise SystemExit(143) from None


@contextlib.contextmanager
def one_line_warnings():
    """Python's warnings as ``deqir: warning: ...`` lines (not file:line and the source line)."""
    import warnings
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: f"deqir: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = previous


def versions() -> dict:
    """What made an output: this package, torch, Python and the libraries that decode and encode."""
    import platform

    import numpy
    import PIL
    import torch

    from deqir_dist import __version__
    return {"deqir_dist": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "numpy": numpy.__version__, "pillow": PIL.__version__, "platform": platform.platform()}


def serial_ranks_note(records: list[dict], world: int) -> str | None:
    """Under torchrun (``world`` > 1), a line when images ran the serial solver: it does not shard,
    so the images are dealt over the ranks (``dataset.dealt``: each restores every P-th), or, with
    tiles given, every rank ran the whole chain (its calls' tiles split over the ranks). solver="auto"
    picks serial where it predicts no speed-up, which on CPUs is most sizes."""
    if world <= 1:
        return None
    if any(r.get("solver") == "serial" and "dealt_to_rank" in r for r in records):
        return (f"deqir: note: the serial solver does not shard an image's chain, so the images are dealt over the "
                f"{world} ranks (rank r restores images r, r + {world}, ... alone); give --solver picard to split "
                "each chain over the ranks instead")
    serial = [r for r in records if r.get("solver") == "serial"]
    if not serial:
        return None
    return (f"deqir: note: {serial[0].get('id', 'an image')} ran the serial solver, which does not shard: each "
            f"of the {world} ranks runs the whole chain, no faster than one process; launch one process, or "
            "give --solver picard to split the chain over the ranks")
