"""Restore a whole dataset on a Ray cluster: the flags of ``deqir ray-restore``.

    python launch/ray_restore.py INPUT -o OUT --task sr_bicubic --scale 4 --address auto \
        [--workers N] [--gpus-per-worker P] [--images-per-batch B] [sampler flags]

``--address local`` (the default) starts a Ray instance on this machine; ``auto`` joins the
cluster this machine belongs to (``ray start`` / ``ray up`` / a KubeRay or SLURM job, see
``cluster/``); ``HOST:PORT`` joins that head node. Rerunning the same command resumes: images
already written with the same configuration are skipped. Exit status: 0 all images ok, 1 some
failed (see OUT/results.jsonl), 2 bad input (nothing was written).
"""
import sys

from deqir_dist.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["ray-restore", *sys.argv[1:]]))
