"""Restore images with each chain sharded over the ranks of a torchrun job.

    torchrun --nproc_per_node=P launch/restore.py --task sr_bicubic --scale 4 INPUT... -o DIR

Takes exactly the flags of ``deqir restore``; rendezvous is env:// (torchrun sets it). Every rank
reads the inputs and evaluates the denoiser on its block of timestep rows; only rank 0 writes
files and prints the summary.
"""
import sys

from deqir_dist.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["restore", "--distributed", *sys.argv[1:]]))
