"""What every command runs inside: the decode caps of ``--max-pixels`` (io.limits) and, for the
commands that write an output folder (degrade, restore, ray-restore), that folder's lock for the
whole command (io.outdir.OutputFolder: a second job on the same folder fails at once, naming the
holder; a folder the command created is removed again if it fails)."""
from __future__ import annotations

import contextlib
import os

from deqir_dist.io.limits import decode_limits
from deqir_dist.io.outdir import OutputFolder

LOCKED_COMMANDS = ("degrade", "restore", "ray-restore")


@contextlib.contextmanager
def job_guard(args):
    with contextlib.ExitStack() as stack:
        stack.enter_context(decode_limits(max_pixels=getattr(args, "max_pixels", None)))
        out = getattr(args, "out", None)
        # under torchrun only rank 0 writes, so only rank 0 holds the lock
        writer = not getattr(args, "distributed", False) or os.environ.get("RANK", "0") == "0"
        if args.command in LOCKED_COMMANDS and out and writer:
            stack.enter_context(OutputFolder(out, command=f"deqir {args.command}"))
        yield
