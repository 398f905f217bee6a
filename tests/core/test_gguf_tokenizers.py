"""A GGUF of every architecture asyncllm loads gets a working tokenizer and chat template from its metadata.

Each test writes a tiny GGUF holding only tokenizer metadata (and one placeholder tensor), as llama.cpp
writes it: a byte-level BPE vocabulary (``tokenizer.ggml.model`` "gpt2", with merges) or a SentencePiece
one ("llama", with scores and token types), the special token ids and ``tokenizer.chat_template``. The
reference is transformers' own GGUF tokenizer loading, ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers, trainers

from asyncllm.tokenizer import Tokenizer

from ._tokenizers import CHATML_TEMPLATE, CORPUS, build_sentencepiece_backend

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "user", "content": "Name a river, s'il te plaît 🙂"},
    {"role": "assistant", "content": "The Nile — très long."},
]

# (architecture, tokenizer.ggml.pre) of the byte-level BPE files: Llama 3, Qwen 2/3 and their MoE, Phi-4
# (phi3 architecture, GPT-4o split) and InternLM 3-style files.
BPE_FILES = [
    ("llama", "llama-bpe"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen2"),
    ("qwen2moe", "qwen2"),
    ("qwen3moe", "qwen2"),
    ("phi3", "gpt-4o"),
    ("internlm2", "qwen2"),
]
# Architectures of the SentencePiece files: Llama 2, Gemma 2/3, Phi-3 and InternLM2.
SENTENCEPIECE_FILES = ["llama", "gemma2", "gemma3", "phi3", "internlm2"]

# transformers has no GGUF loader for these architectures (its AutoTokenizer refuses the file), so the
# reference is the same vocabulary written under an architecture it loads with the same converter.
REFERENCE_ARCHITECTURE = {("internlm2", "gpt2"): "qwen2", ("internlm2", "llama"): "llama"}

BPE_TEXTS = ["Hello world", "Café naïve résumé", "emoji 🙂🎉 ok", "a <|im_end|> b<|im_start|>", "  two  spaces"]
SENTENCEPIECE_TEXTS = ["Hello world", "Café naïve résumé", "emoji 🙂🎉 ok", "a <end_of_turn> b<start_of_turn>",
                       "  two  spaces"]


def _bpe_vocabulary() -> tuple[list[str], list[str], list[int]]:
    """Tokens, merges and token types of a byte-level BPE trained on ``CORPUS``; the ChatML markers are
    control tokens, as in a Qwen file."""
    trainer_tokenizer = RustTokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    trainer_tokenizer.train_from_iterator(CORPUS * 10, trainer)
    spec = json.loads(trainer_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    token_types = [gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL for t in tokens]
    return tokens, merges, token_types


def _sentencepiece_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a byte-fallback SentencePiece-style vocabulary with Gemma's turn
    markers as control tokens."""
    backend = build_sentencepiece_backend("metaspace", extra_special=("<start_of_turn>", "<end_of_turn>"))
    vocab = json.loads(backend.to_str())["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)

    def token_type(token: str) -> int:
        if token == "<unk>":
            return gguf.TokenType.UNKNOWN
        if token.startswith("<0x"):
            return gguf.TokenType.BYTE
        if token.startswith("<") and token.endswith(">"):
            return gguf.TokenType.CONTROL
        return gguf.TokenType.NORMAL

    return tokens, [-float(i) for i in range(len(tokens))], [int(token_type(t)) for t in tokens]


def _write(path: Path, architecture: str, model: str, *, tokens: list[str], token_types: list[int],
           bos: int | None, eos: int, chat_template: str, pre: str | None = None,
           merges: list[str] | None = None, scores: list[float] | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if merges is not None:
        writer.add_token_merges(merges)
    if scores is not None:
        writer.add_token_scores(scores)
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_chat_template(chat_template)
    writer.add_tensor("placeholder", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_bpe(directory: Path, architecture: str, pre: str) -> Path:
    tokens, merges, token_types = _bpe_vocabulary()
    return _write(directory / f"{architecture}-bpe.gguf", architecture, "gpt2", pre=pre, tokens=tokens,
                  merges=merges, token_types=token_types, bos=None, eos=tokens.index("<|im_end|>"),
                  chat_template=CHATML_TEMPLATE)


def _write_sentencepiece(directory: Path, architecture: str) -> Path:
    tokens, scores, token_types = _sentencepiece_vocabulary()
    return _write(directory / f"{architecture}-sp.gguf", architecture, "llama", tokens=tokens, scores=scores,
                  token_types=token_types, bos=tokens.index("<s>"), eos=tokens.index("<end_of_turn>"),
                  chat_template=GEMMA_TEMPLATE)


def _reference(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _metadata(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _check_against_reference(ours: Tokenizer, reference: Any, texts: list[str]) -> None:
    for text in texts:
        assert ours.encode(text) == list(reference.encode(text)), text
        assert ours.encode(text, add_special_tokens=False) == list(
            reference.encode(text, add_special_tokens=False)), text
    for generation_prompt in (True, False):
        expected = reference.apply_chat_template(CONVERSATION, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        assert ours.render_chat(CONVERSATION, add_generation_prompt=generation_prompt) == expected
    assert ours.bos_token_id == reference.bos_token_id
    assert reference.eos_token_id in ours.eos_token_ids


@pytest.mark.parametrize(("architecture", "pre"), BPE_FILES)
def test_byte_level_bpe_gguf_matches_transformers(tmp_path: Path, architecture: str, pre: str) -> None:
    """A "gpt2" vocabulary under each architecture encodes and renders its chat template as transformers
    does; for InternLM2, which transformers' AutoTokenizer does not load from a GGUF, the reference is the
    same vocabulary written as a qwen2 file."""
    path = _write_bpe(tmp_path, architecture, pre)
    ours = Tokenizer.from_path(path)
    reference_architecture = REFERENCE_ARCHITECTURE.get((architecture, "gpt2"), architecture)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference = _reference(_write_bpe(reference_dir, reference_architecture, pre))
    assert ours.chat_template == CHATML_TEMPLATE
    _check_against_reference(ours, reference, BPE_TEXTS)
    assert Tokenizer.from_gguf_metadata(_metadata(path), path=path).encode(BPE_TEXTS[3]) == ours.encode(BPE_TEXTS[3])


@pytest.mark.parametrize("architecture", SENTENCEPIECE_FILES)
def test_sentencepiece_gguf_matches_transformers(tmp_path: Path, architecture: str) -> None:
    """A "llama" (SentencePiece) vocabulary under each architecture encodes, with its BOS, and renders its
    chat template as transformers does; for InternLM2, which transformers' AutoTokenizer does not load
    from a GGUF, the reference is the same vocabulary written as a llama file."""
    path = _write_sentencepiece(tmp_path, architecture)
    ours = Tokenizer.from_path(path)
    reference_architecture = REFERENCE_ARCHITECTURE.get((architecture, "llama"), architecture)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference = _reference(_write_sentencepiece(reference_dir, reference_architecture))
    assert ours.chat_template == GEMMA_TEMPLATE
    _check_against_reference(ours, reference, SENTENCEPIECE_TEXTS)
    assert ours.encode("Hello")[0] == ours.bos_token_id
    rendered = ours.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert rendered.count(ours.bos_token_id) == 1
    built = Tokenizer.from_gguf_metadata(_metadata(path), path=path)
    assert built.encode(SENTENCEPIECE_TEXTS[3]) == ours.encode(SENTENCEPIECE_TEXTS[3])


def test_unknown_tokenizer_model_names_the_file_and_model(tmp_path: Path) -> None:
    tokens, _, token_types = _bpe_vocabulary()
    path = _write(tmp_path / "odd.gguf", "internlm2", "rwkv", tokens=tokens, token_types=token_types, bos=None,
                  eos=0, chat_template=CHATML_TEMPLATE)
    with pytest.raises(ValueError, match=r"odd\.gguf.*'internlm2'.*'rwkv'"):
        Tokenizer.from_path(path)
    with pytest.raises(ValueError, match=r"odd\.gguf.*'rwkv'"):
        Tokenizer.from_gguf_metadata(_metadata(path), path=path)
