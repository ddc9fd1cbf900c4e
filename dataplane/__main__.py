"""``python -m dataplane``: the same command line as ``dataplane`` (see :mod:`dataplane.cli`)."""

import sys

from dataplane.cli import main

sys.exit(main())
