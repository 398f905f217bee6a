"""Reading the JSON files that model directories carry (``config.json``, tokenizer configs, shard indexes)."""

from __future__ import annotations

import json
import pathlib
from typing import Any


def read_json_object(path: pathlib.Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object stored at ``path``; ``{}`` for a missing file when ``missing_ok``. Invalid JSON or a
    value other than an object raises ``ValueError`` naming the file."""
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
