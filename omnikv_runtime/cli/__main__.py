"""``python -m omnikv_runtime.cli``: the ``omnikv`` command."""

import sys

from omnikv_runtime.cli import main

sys.exit(main())
