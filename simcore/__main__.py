"""``python -m simcore``: the same as the ``simcore`` console command."""

import sys

from simcore.cli import main

sys.exit(main())
