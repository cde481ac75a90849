"""The ``presence-client`` command: the terminal client, if its extra is installed.

The package itself (codec and SDK) needs only msgpack and precis-i18n; the terminal
client also needs rich, from ``presence-client[terminal]``. Without it the command says
so in one line and exits 1, rather than with an ImportError traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Final

PROG: Final = "presence-client"
INSTALL_HINT: Final = (
    f"{PROG}: error: the terminal client needs rich, which is not installed; "
    "install it with: pip install 'presence-client[terminal]'"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the terminal client; 1 with one line if rich is missing."""
    try:
        import rich  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr, flush=True)
        return 1
    from presence_client.terminal import main as terminal_main

    return terminal_main(argv)
