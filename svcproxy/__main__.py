"""``python -m svcproxy`` is the same as the ``svcproxy`` console script."""

import sys

from svcproxy.cli import main

sys.exit(main())
