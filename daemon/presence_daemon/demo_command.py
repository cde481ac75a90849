"""The ``presence-demo`` command, if its extra is installed.

The demo renders with rich (``presence-daemon[demo]`` brings it, and an embedded Redis);
without rich the command says so in one line and exits 1, rather than with an
ImportError traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Final

INSTALL_HINT: Final = (
    "presence-demo: error: the demo needs rich, which is not installed; "
    "install it with: pip install 'presence-daemon[demo]'"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 1 with one line if rich is missing."""
    try:
        import rich  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr, flush=True)
        return 1
    from presence_daemon.demo import main as demo_main

    return demo_main(argv)
