"""``python -m awqkit`` and ``torchrun -m awqkit``: the command line."""

import sys

from awqkit.cli import main

sys.exit(main())
