"""The chain as mathematics: the schedule and per-row coefficients, the denoiser protocol, the
serial sampler (the reference), the joint map on a block of rows, its adjoint, and the noise draws.
No solver, no communication, no files."""
