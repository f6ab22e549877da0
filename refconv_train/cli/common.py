"""What every entry point shares: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ..errors import RefconvError


def run_cli(main: Callable[[], int | None]) -> int:
    """Run ``main``; a :class:`RefconvError` (bad config, data, checkpoint) prints ``error: ...`` and exits 2."""
    try:
        return main() or 0
    except RefconvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`refconv-study ... --dry-run | head`): stop quietly, as a shell does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141
