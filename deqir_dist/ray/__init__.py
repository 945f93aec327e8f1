"""Executing dataset jobs on Ray: the driver's job, its pool of workers, the worker actor, and
joining a cluster."""

from deqir_dist.ray.data import DeqirRestorer  # noqa: E402  (Ray Data's callable class; imports no ray)

__all__ = ["DeqirRestorer"]
