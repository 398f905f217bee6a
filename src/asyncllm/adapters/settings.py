"""``ServerSettings``: the validated policy of one OpenAI-compatible app."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    """Policy of one app.

    ``model_name``: the id clients must use as ``model`` (requests naming another model get 404; an absent
    ``model`` means this one). ``api_keys``: accepted bearer tokens (empty: no authentication).
    ``max_body_bytes``: larger request bodies get 413. ``max_waiting``: while the engine has this many
    requests queued, new generation requests get 503 (``None``: never). ``max_n``: the largest ``n``.
    ``max_sessions`` / ``session_idle_timeout`` (seconds): the cap on open sessions and how long an idle one
    lives. ``default_max_tokens``: the completion limit when a request gives none (``None``: until the
    context is full), clamped to the room the prompt leaves.
    """

    model_name: str = "asyncllm"
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    max_waiting: int | None = 1024
    max_n: int = 16
    max_sessions: int = 256
    session_idle_timeout: float = 900.0
    default_max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError("model_name: must be a non-empty string")
        keys = (self.api_keys,) if isinstance(self.api_keys, str) else tuple(self.api_keys)
        if any(not isinstance(k, str) or not k or k != k.strip() for k in keys):
            raise ValueError("api_keys: must be non-empty strings without surrounding whitespace")
        object.__setattr__(self, "api_keys", keys)
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes: must be >= 1, got {self.max_body_bytes}")
        if self.max_waiting is not None and self.max_waiting < 1:
            raise ValueError(f"max_waiting: must be >= 1 or None, got {self.max_waiting}")
        if self.max_n < 1:
            raise ValueError(f"max_n: must be >= 1, got {self.max_n}")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions: must be >= 1, got {self.max_sessions}")
        if not (self.session_idle_timeout > 0 and math.isfinite(self.session_idle_timeout)):
            raise ValueError(f"session_idle_timeout: must be a positive number of seconds, "
                             f"got {self.session_idle_timeout}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens: must be >= 1 or None, got {self.default_max_tokens}")
