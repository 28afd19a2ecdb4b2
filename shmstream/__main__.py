"""``python -m shmstream``: the ``shmstream`` command."""

import sys

from shmstream.cli.main import main

sys.exit(main())
