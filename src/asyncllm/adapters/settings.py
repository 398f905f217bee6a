"""``ServerSettings``: the validated policy of one OpenAI-compatible app."""

from __future__ import annotations

import math
from dataclasses import dataclass

from asyncllm.image_inputs import ImageFetchPolicy


@dataclass(frozen=True)
class ServerSettings:
    """Policy of one app.

    ``model_name``: the id clients must use as ``model`` (requests naming another model get 404; an absent
    ``model`` means this one). ``api_keys``: accepted bearer tokens (empty: no authentication).
    ``max_body_bytes``: larger request bodies get 413. ``max_waiting``: while the engine has this many
    requests queued, new generation requests get 503 (``None``: never). ``max_n``: the largest ``n``.
    ``max_sessions`` / ``max_sessions_per_key`` / ``session_idle_timeout`` (seconds): the cap on open
    sessions in all and per API key (without API keys every client is the same principal and only
    ``max_sessions`` applies), and how long an idle one lives. ``default_max_tokens``: the completion limit
    when a request gives none (``None``: until the context is full), clamped to the room the prompt leaves.
    ``max_tokens_limit``: the largest ``max_tokens`` a request may ask for (larger get 400; ``None``: only
    the context limits it).

    Images in chat messages (``image_url`` parts): ``data:`` URLs are always read; an ``http(s)`` URL is
    fetched only when its host is one of ``allowed_image_hosts`` (exact names, case-insensitive; empty, the
    default: remote images are refused with 400), within ``image_fetch_timeout`` seconds and
    ``max_image_bytes`` bytes. How many images a request may hold and how large they may be are the
    engine's ``max_images_per_request`` and ``max_image_pixels``.
    """

    model_name: str = "asyncllm"
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    max_waiting: int | None = 1024
    max_n: int = 16
    max_sessions: int = 256
    max_sessions_per_key: int = 64
    session_idle_timeout: float = 900.0
    default_max_tokens: int | None = 512
    max_tokens_limit: int | None = None
    allowed_image_hosts: tuple[str, ...] = ()
    image_fetch_timeout: float = 10.0
    max_image_bytes: int = 20 * 1024 * 1024

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
        if self.max_sessions_per_key < 1:
            raise ValueError(f"max_sessions_per_key: must be >= 1, got {self.max_sessions_per_key}")
        if not (self.session_idle_timeout > 0 and math.isfinite(self.session_idle_timeout)):
            raise ValueError(f"session_idle_timeout: must be a positive number of seconds, "
                             f"got {self.session_idle_timeout}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens: must be >= 1 or None, got {self.default_max_tokens}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit: must be >= 1 or None, got {self.max_tokens_limit}")
        if (self.max_tokens_limit is not None and self.default_max_tokens is not None
                and self.default_max_tokens > self.max_tokens_limit):
            raise ValueError(f"default_max_tokens: must be <= max_tokens_limit ({self.max_tokens_limit}), "
                             f"got {self.default_max_tokens}")
        hosts = self.allowed_image_hosts
        object.__setattr__(self, "allowed_image_hosts", (hosts,) if isinstance(hosts, str) else tuple(hosts))
        self.image_fetch_policy()  # validates the image fields

    def image_fetch_policy(self) -> ImageFetchPolicy:
        """Where this app reads images from (``ValueError`` naming the field for a bad setting)."""
        return ImageFetchPolicy(self.allowed_image_hosts, self.image_fetch_timeout, self.max_image_bytes)
