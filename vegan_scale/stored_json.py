"""JSON read back from storage, where a file may be damaged: every way its bytes fail to be JSON is a ValueError.

``json.loads`` already raises ValueError for text that is not JSON (JSONDecodeError) and for bytes that are not
UTF-8 (UnicodeDecodeError), but RecursionError for nesting deeper than Python follows; the readers of run records,
checkpoints and shard indexes catch one error instead of knowing all three.
"""

from __future__ import annotations

import json
from typing import Any


def loads(data: str | bytes) -> Any:
    """``json.loads(data)``; ValueError for anything that is not JSON, however deeply nested."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested more deeply than Python can follow") from None
