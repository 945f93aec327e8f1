"""Everything with argparse or a terminal: the ``deqir`` command, its flags, the demo, the
benchmark command and prior training."""
