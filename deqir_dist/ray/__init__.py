"""Executing dataset jobs on Ray: the driver's job, its pool of workers, the worker actor, and
joining a cluster."""
