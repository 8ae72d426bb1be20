"""``python -m flowsim``: the command line of :mod:`flowsim.cli`, as the ``flowsim`` command. Nothing else."""
import sys

from flowsim.cli import main

sys.exit(main())
