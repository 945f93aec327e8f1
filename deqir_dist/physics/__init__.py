"""Forward models A with their pseudo-inverses A+ and projectors: one operator family per file,
``registry.make_operator`` to build one by name."""
