"""Fixed-point solvers for the joint map: options (every solver default), the driver loop, the
update rules (picard, anderson, window) and their registry, and the adjoint solver."""
