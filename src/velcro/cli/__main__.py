"""``python -m velcro.cli``: the `velcro` command."""

import sys

from velcro.cli import main

sys.exit(main())
