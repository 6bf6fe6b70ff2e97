"""``python -m recserve.cli ...``: the same CLI as the ``recserve`` script (for a checkout
without the package installed)."""

import sys

from recserve.cli.main import main

sys.exit(main())
