"""The public entry points: ``restore``, the noise gradient and noise optimisation, and the planner
that chooses a solver from the model's measured cost."""
