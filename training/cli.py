"""Output channel of the training commands (the CLI layer of ``training/``).

Library code logs; the ``main`` entry points of ``sft``, ``grpo``, ``eval``,
``export`` and ``predict`` hand their result (one JSON line, or text a user
reads) to :func:`emit`, which writes it to standard output so it can be piped.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def emit(result: Any) -> None:
    """Write ``result`` to stdout: a string as is, anything else as one JSON line; flushed."""
    line = result if isinstance(result, str) else json.dumps(result)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
