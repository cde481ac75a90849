"""``python -m presence_client``: the terminal client (same as ``presence-client``)."""

import sys

from presence_client.command import main

sys.exit(main())
