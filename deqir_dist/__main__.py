"""``python -m deqir_dist``: the ``deqir`` command line."""
import sys

from deqir_dist.apps.cli import main

sys.exit(main())
