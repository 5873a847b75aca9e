"""Run the ``matlora`` command as ``python -m matlora`` (also what ``accelerate launch -m matlora`` needs)."""

import sys

from matlora.cli import main

sys.exit(main())
