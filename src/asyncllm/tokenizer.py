"""Tokenizer: text <-> token ids and chat-template rendering, backed by a Hugging Face fast tokenizer.

``Tokenizer.from_path`` reads a local Hugging Face model directory (``tokenizer.json`` plus
``tokenizer_config.json`` / ``chat_template.jinja`` / ``generation_config.json``) or a ``.gguf`` file, whose
metadata carries the vocabulary, merges, special tokens and chat template. Streaming decode lives in
``asyncllm.detokenizer`` (re-exported here).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import tokenizers

from asyncllm.chat_template import compile_chat_template, validate_messages
from asyncllm.detokenizer import IncrementalDetokenizer
from asyncllm.json_files import read_json_object

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

_GGUF_MAGIC = b"GGUF"
# Tokenizer config names of the special tokens, and the ``tokenizer.ggml.*_token_id`` keys naming them.
_GGUF_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Placeholders used to find the token a chat template closes an assistant turn with.
_PROBE_USER = "\x02probe-user\x03"
_PROBE_ASSISTANT = "\x02probe-assistant\x03"


class Tokenizer:
    """A fast (Rust ``tokenizers``) tokenizer plus the special-token facts and chat template of one model.

    Invariants:
    - ``encode(text, add_special_tokens=False)`` never adds BOS/EOS; with ``add_special_tokens=True`` BOS is
      prepended iff the tokenizer's own config says so: the ``add_bos_token`` flag when one is given (GGUF
      metadata), else the ``tokenizer.json`` post-processor (as transformers does); likewise EOS;
    - ``all_special_ids`` are exactly the ids ``decode(..., skip_special_tokens=True)`` drops;
    - ``apply_chat_template(m)`` equals ``encode(render_chat(m), add_special_tokens=False)``: the template
      writes any BOS itself.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
    ) -> None:
        if not isinstance(backend, tokenizers.Tokenizer):
            raise ValueError(f"backend: must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special_tokens: dict[str, str | None] = {
            "bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token,
        }
        for name, token in self._special_tokens.items():
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name}: {token!r} is not in the vocabulary")
        self._add_special_explicit = add_bos_token is not None or add_eos_token is not None
        self._add_bos = bool(add_bos_token)
        self._add_eos = bool(add_eos_token)
        self._all_special_ids = tuple(
            sorted(i for i, token in backend.get_added_tokens_decoder().items() if token.special)
        )
        for index, token_id in enumerate(extra_eos_token_ids):
            if not _is_token_id(token_id, self._vocab_size):
                raise ValueError(f"extra_eos_token_ids[{index}]: {token_id!r} is not a token id "
                                 f"in [0, {self._vocab_size})")
        self._template: jinja2.Template | None = None
        if chat_template is not None:
            if not isinstance(chat_template, str) or not chat_template.strip():
                raise ValueError("chat_template: must be a non-empty string or None")
            self._template = compile_chat_template(chat_template)
        self._chat_template = chat_template
        eos_ids: list[int] = []
        eos_id = self._token_id("eos_token")
        if eos_id is not None:
            eos_ids.append(eos_id)
        eos_ids.extend(int(i) for i in extra_eos_token_ids)
        end_of_turn = self._end_of_turn_id()
        if end_of_turn is not None:
            eos_ids.append(end_of_turn)
        self._eos_token_ids = tuple(dict.fromkeys(eos_ids))

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load from a local Hugging Face model directory, its ``tokenizer.json``, or a ``.gguf`` file.

        Raises ``FileNotFoundError`` when the path does not exist or a directory holds no tokenizer, and
        ``ValueError`` when a file is neither a GGUF nor a ``tokenizer.json``.
        """
        target = Path(path)
        if not target.exists():
            raise FileNotFoundError(f"path: {target} does not exist")
        if target.is_dir():
            return _load_hf_directory(target)
        if target.name == "tokenizer.json":
            return _load_hf_directory(target.parent)
        if _is_gguf(target):
            return _load_gguf(target)
        raise ValueError(f"path: {target} is neither a model directory, a tokenizer.json nor a GGUF file")

    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], *, path: str | os.PathLike[str] | None = None
    ) -> Tokenizer:
        """Build from a GGUF file's already parsed metadata (``general.architecture``, ``tokenizer.*``), so
        the file is not read a second time; the result equals ``from_path`` on that file.

        ``path`` names the file in error messages, and is read only on a transformers without GGUF
        tokenizer converters.
        """
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING
        except ImportError:
            if path is None:
                raise
            return _load_gguf_with_auto_tokenizer(Path(path))
        architecture = metadata.get("general.architecture")
        if not isinstance(architecture, str):
            raise ValueError(f"path: {path}: GGUF metadata has no general.architecture")
        tokenizer_dict, config = (
            {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
            for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"], GGUF_TOKENIZER_MAPPING["tokenizer_config"])
        )
        # As transformers' get_gguf_tokenizer: llama.cpp adds BOS to a sentencepiece vocabulary that does
        # not say otherwise.
        if tokenizer_dict.get("tokenizer_type") == "llama":
            config.setdefault("add_bos_token", True)
        tokens = tokenizer_dict.get("tokens")
        for name, key in _GGUF_SPECIAL_TOKEN_IDS.items():
            token_id = metadata.get(f"tokenizer.ggml.{key}")
            config[name] = tokens[token_id] if token_id is not None and isinstance(tokens, list) else None
        return _gguf_tokenizer(architecture, tokenizer_dict, config, path)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings inside ``text`` map to their single ids."""
        if not isinstance(text, str):
            raise ValueError(f"text: must be a str, got {type(text).__name__}")
        if not self._add_special_explicit:
            return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)
        ids = list(self._backend.encode(text, add_special_tokens=False).ids)
        if add_special_tokens:
            bos_id, eos_id = self._token_id("bos_token"), self._token_id("eos_token")
            if self._add_bos and bos_id is not None:
                ids.insert(0, bos_id)
            if self._add_eos and eos_id is not None:
                ids.append(eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (no clean-up of tokenization spaces); ids past the vocabulary are dropped and a
        negative id raises ``ValueError``."""
        id_list = list(ids)
        if id_list and min(id_list) < 0:
            raise ValueError(f"ids: token ids must be non-negative, got {min(id_list)}")
        return self._backend.decode(id_list, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # ------------------------------------------------------------------ chat

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The chat template rendered over ``messages`` (``{"role": str, "content": str}`` mappings)."""
        if self._template is None:
            raise ValueError("messages: this tokenizer has no chat template; encode plain text instead")
        checked = validate_messages(messages)
        return self._template.render(
            messages=checked,
            add_generation_prompt=bool(add_generation_prompt),
            tools=None,
            documents=None,
            **{name: token for name, token in self._special_tokens.items() if token is not None},
        )

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of ``render_chat(messages)``, with no BOS/EOS added beyond what the template writes."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt),
                           add_special_tokens=False)

    # ------------------------------------------------------------------ special tokens

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: EOS, ``generation_config.json``'s EOS ids, and the chat template's
        end-of-turn token when that is a special token (``<|im_end|>``, ``<|eot_id|>``, ...)."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    @property
    def vocab_size(self) -> int:
        """Size of the full vocabulary, added tokens included."""
        return self._vocab_size

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        """Ids of the special tokens (sorted): exactly those ``decode(skip_special_tokens=True)`` drops."""
        return self._all_special_ids

    @property
    def special_tokens(self) -> dict[str, str]:
        """``{"bos_token": ..., "eos_token": ...}`` for the named special tokens this tokenizer has."""
        return {name: token for name, token in self._special_tokens.items() if token is not None}

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def add_bos_token(self) -> bool | None:
        """Whether ``encode(..., add_special_tokens=True)`` prepends BOS by an explicit flag (GGUF metadata);
        ``None`` when the backend's ``tokenizer.json`` post-processor decides."""
        return self._add_bos if self._add_special_explicit else None

    @property
    def add_eos_token(self) -> bool | None:
        """As ``add_bos_token``, for appending EOS."""
        return self._add_eos if self._add_special_explicit else None

    def _token_id(self, name: str) -> int | None:
        token = self._special_tokens[name]
        return None if token is None else self._backend.token_to_id(token)

    def _end_of_turn_id(self) -> int | None:
        """The special token the template writes right after an assistant message, if any."""
        if self._template is None:
            return None
        probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
        try:
            rendered = self.render_chat(probe, add_generation_prompt=False)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError):
            return None
        position = rendered.find(_PROBE_ASSISTANT)
        if position < 0:
            return None
        after = rendered[position + len(_PROBE_ASSISTANT):].lstrip()
        ids = self._backend.encode(after, add_special_tokens=False).ids if after else []
        return ids[0] if ids and ids[0] in self._all_special_ids else None


def _is_token_id(value: object, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


# ---------------------------------------------------------------------- Hugging Face directories


def _token_content(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` spells it: a string or an ``AddedToken`` dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_chat_template(value: Any) -> str | None:
    """A template string, or the ``default`` (else first) of a list of named templates."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, Mapping)}
        chosen = named.get("default", next(iter(named.values()), None))
        return chosen if isinstance(chosen, str) else None
    return None


def _load_hf_directory(directory: Path) -> Tokenizer:
    config = read_json_object(directory / "tokenizer_config.json", missing_ok=True)
    special_map = read_json_object(directory / "special_tokens_map.json", missing_ok=True)
    generation = read_json_object(directory / "generation_config.json", missing_ok=True)
    if (directory / "tokenizer.json").is_file():
        backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    elif (directory / "tokenizer.model").is_file():
        backend = _convert_slow_tokenizer(directory)
    else:
        raise FileNotFoundError(f"path: {directory} holds no tokenizer.json or tokenizer.model")

    tokens = {
        name: _token_content(config.get(name)) or _token_content(special_map.get(name))
        for name in _SPECIAL_TOKEN_NAMES
    }
    if tokens["bos_token"] is None and isinstance(generation.get("bos_token_id"), int):
        tokens["bos_token"] = backend.id_to_token(generation["bos_token_id"])
    tokens = {name: token if token is not None and backend.token_to_id(token) is not None else None
              for name, token in tokens.items()}

    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        chat_template = template_file.read_text(encoding="utf-8")
    else:
        stored = read_json_object(directory / "chat_template.json", missing_ok=True)
        chat_template = _pick_chat_template(stored.get("chat_template"))
        if chat_template is None:
            chat_template = _pick_chat_template(config.get("chat_template"))

    eos = generation.get("eos_token_id")
    eos_list = eos if isinstance(eos, list) else [eos]
    extra_eos = [i for i in eos_list if isinstance(i, int) and not isinstance(i, bool)]
    # As in transformers, tokenizer.json's post-processor decides BOS/EOS; the config's add_*_token flags are
    # already reflected there (or, for a converted tokenizer.model, applied by the conversion).
    return Tokenizer(backend, **tokens, chat_template=chat_template, extra_eos_token_ids=extra_eos)


def _convert_slow_tokenizer(directory: Path) -> tokenizers.Tokenizer:
    """A ``tokenizer.model``-only directory, converted to a fast tokenizer by transformers."""
    from transformers import AutoTokenizer

    converted = AutoTokenizer.from_pretrained(str(directory))
    backend = getattr(converted, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise ValueError(f"path: {directory}: no fast tokenizer could be built from tokenizer.model")
    return backend


# ---------------------------------------------------------------------- GGUF


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == _GGUF_MAGIC


def _load_gguf(path: Path) -> Tokenizer:
    """Build the tokenizer a GGUF's metadata describes, without touching its tensor data.

    Uses transformers' GGUF tokenizer converters on the metadata alone (fast); on a transformers without
    them, falls back to ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import get_gguf_tokenizer
    except ImportError:
        return _load_gguf_with_auto_tokenizer(path)

    architecture, tokenizer_dict, config = get_gguf_tokenizer(str(path))
    return _gguf_tokenizer(architecture, tokenizer_dict, config, path)


def _gguf_tokenizer(
    architecture: str, tokenizer_dict: dict[str, Any], config: dict[str, Any], path: str | os.PathLike[str] | None
) -> Tokenizer:
    """The tokenizer of transformers' GGUF tokenizer inputs ``(architecture, tokenizer dict, config)``.

    transformers picks the converter by the file's tokenizer model (``tokenizer.ggml.model``: "gpt2" for
    byte-level BPE, "llama" for SentencePiece), with its own fixes for a few architectures (Gemma, Phi-3),
    so an architecture it has no model loader for (InternLM2) still gets the tokenizer its model type
    describes. A model type it cannot build is a ``ValueError`` naming the file and the model type.
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    if "tokens" not in tokenizer_dict:
        raise ValueError(f"path: {path} has no tokenizer.ggml.tokens metadata")
    try:
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ValueError as error:
        raise ValueError(
            f"path: {path}: cannot build a tokenizer for architecture {architecture!r} from "
            f"tokenizer.ggml.model {tokenizer_dict.get('tokenizer_type')!r}: {error}"
        ) from error
    tokens = {name: _token_content(config.get(name)) for name in _SPECIAL_TOKEN_NAMES}
    return Tokenizer(
        backend,
        **tokens,
        add_bos_token=config.get("add_bos_token") if isinstance(config.get("add_bos_token"), bool) else None,
        add_eos_token=config.get("add_eos_token") if isinstance(config.get("add_eos_token"), bool) else None,
        chat_template=_pick_chat_template(config.get("chat_template")),
    )


def _load_gguf_with_auto_tokenizer(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    backend = getattr(loaded, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise ValueError(f"path: {path}: transformers could not build a fast tokenizer from this GGUF")
    add_bos = getattr(loaded, "add_bos_token", None)
    add_eos = getattr(loaded, "add_eos_token", None)
    return Tokenizer(
        backend,
        **{name: getattr(loaded, name, None) for name in _SPECIAL_TOKEN_NAMES},
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
        add_eos_token=add_eos if isinstance(add_eos, bool) else None,
        chat_template=_pick_chat_template(getattr(loaded, "chat_template", None)),
    )

