"""``python -m presence_daemon``: same as the ``presence-daemon`` command."""

import sys

from presence_daemon.cli import main

sys.exit(main())
