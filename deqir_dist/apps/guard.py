"""What every command runs inside: the decode caps of ``--max-pixels`` (io.limits), SIGTERM as a
clean stop, and, for the commands that write an output folder (degrade, restore, ray-restore),
that folder's lock for the whole command (io.outdir.OutputFolder: a second job on the same
folder fails at once, naming the holder; a folder the command created is removed again if it
fails).

SIGTERM (``kill``, a scheduler's time limit, torchrun stopping the other ranks after one died)
unwinds the command like an error: staged outputs are dropped, the lock is released and the
folders it created are removed; one line goes to stderr and the exit status is 143.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from deqir_dist.io.limits import decode_limits
from deqir_dist.io.outdir import OutputFolder

LOCKED_COMMANDS = ("degrade", "restore", "ray-restore")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every ``with`` and ``finally`` runs."""


def _on_sigterm(signum, frame):
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        rank = os.environ.get("RANK", "?")
        raise Terminated(f"rank {rank} stopped by SIGTERM: torchrun stops every rank when one fails; its "
                         "report below names the failed rank")
    raise Terminated("stopped by SIGTERM")


@contextlib.contextmanager
def _sigterm_unwinds():
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
            stack.enter_context(_sigterm_unwinds())
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
