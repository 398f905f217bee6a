"""Tokenizer loading, encode/decode and chat templates, checked against transformers and the GGUF metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer

from asyncllm.tokenizer import Tokenizer

from ._tokenizers import CORPUS, build_sentencepiece_backend

LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "Café naïve résumé — “quotes” and 'apostrophes'",
    "你好，世界！日本語のテキスト。한국어",
    "emoji 🙂🎉👩‍💻🇫🇷 and e\u0301 combining",
    "code: def f(x):\n\treturn x ** 2  # comment\n\n",
    "special <|im_end|> inside text",
]


def build_sentencepiece_dir(directory: Path, *, decoder_style: str, chat_template: str | None,
                            extra_special: tuple[str, ...] = ()) -> Path:
    """A Llama-2-style tokenizer (Metaspace pre-tokenizer, byte-fallback BPE) saved as a HF directory."""
    backend = build_sentencepiece_backend(decoder_style, extra_special=extra_special)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                              "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def reference_chat_ids(reference: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    result = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(result if isinstance(result, list) else result["input_ids"])


CONVERSATIONS = [
    [{"role": "user", "content": "Name three rivers."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 你好 🙂"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name three rivers."},
        {"role": "assistant", "content": "Nile, Amazon, Yangtze."},
        {"role": "user", "content": "Which is longest?"},
    ],
]


# ---------------------------------------------------------------------- SmolLM2 GGUF


@pytest.fixture(scope="module")
def gguf_path(smollm2_gguf: Path) -> Path:
    return smollm2_gguf


@pytest.fixture(scope="module")
def smol(smollm2_tokenizer: Tokenizer) -> Tokenizer:
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def smol_reference(gguf_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """Tokenizer metadata read with gguf-py, independently of transformers' converters."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    wanted = ("tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")
    return {key: reader.fields[key].contents() for key in wanted if key in reader.fields}


@pytest.mark.slow
def test_gguf_encode_matches_transformers(smol: Tokenizer, smol_reference: Any) -> None:
    for text in TEXTS:
        assert smol.encode(text) == smol_reference.encode(text), text
        assert smol.encode(text, add_special_tokens=False) == smol_reference.encode(
            text, add_special_tokens=False), text


@pytest.mark.slow
def test_gguf_decode_matches_transformers(smol: Tokenizer, smol_reference: Any) -> None:
    for text in TEXTS:
        ids = [*smol_reference.encode(text), smol.eos_token_ids[0]]
        for skip in (True, False):
            assert smol.decode(ids, skip_special_tokens=skip) == smol_reference.decode(
                ids, skip_special_tokens=skip)


@pytest.mark.slow
def test_gguf_vocabulary_and_special_ids_match_metadata(smol: Tokenizer,
                                                        gguf_metadata: dict[str, Any]) -> None:
    tokens = gguf_metadata["tokenizer.ggml.tokens"]
    assert smol.vocab_size == len(tokens)
    assert [smol.id_to_token(i) for i in range(len(tokens))] == tokens
    assert smol.bos_token_id == gguf_metadata["tokenizer.ggml.bos_token_id"]
    assert gguf_metadata["tokenizer.ggml.eos_token_id"] in smol.eos_token_ids
    assert smol.id_to_token(smol.eos_token_ids[0]) == "<|im_end|>"
    assert gguf_metadata["tokenizer.ggml.add_bos_token"] is False
    assert smol.bos_token_id not in smol.encode("Hello")
    assert smol.chat_template == gguf_metadata["tokenizer.chat_template"]


def test_gguf_tokenizer_from_the_loaders_parsed_metadata_equals_from_path(
    smol: Tokenizer, gguf_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine builds a GGUF's tokenizer from the metadata its checkpoint loader already parsed, without
    reading the file's header again."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping

    from asyncllm.loaders import load_checkpoint

    checkpoint = load_checkpoint(gguf_path)
    assert checkpoint.gguf_metadata is not None

    def no_second_parse(path: str) -> Any:
        raise AssertionError(f"{path} parsed again")

    monkeypatch.setattr(gguf_tokenizer_mapping, "get_gguf_tokenizer", no_second_parse)
    built = Tokenizer.from_gguf_metadata(checkpoint.gguf_metadata, path=gguf_path)
    assert built.vocab_size == smol.vocab_size
    assert [built.id_to_token(i) for i in range(built.vocab_size)] == [
        smol.id_to_token(i) for i in range(smol.vocab_size)]
    assert (built.bos_token_id, built.eos_token_ids, built.all_special_ids, built.chat_template) == (
        smol.bos_token_id, smol.eos_token_ids, smol.all_special_ids, smol.chat_template)
    for text in TEXTS:
        assert built.encode(text) == smol.encode(text), text
    for messages in CONVERSATIONS:
        assert built.apply_chat_template(messages, add_generation_prompt=True) == smol.apply_chat_template(
            messages, add_generation_prompt=True)


def _byte_level_text(tokens: list[str]) -> str:
    """Decode GPT-2 byte-level token spellings (printable stand-ins for bytes) per the published scheme."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    to_byte = {chr(b): b for b in printable}
    shift = 0
    for byte in range(256):
        if byte not in printable:
            to_byte[chr(256 + shift)] = byte
            shift += 1
    return bytes(to_byte[ch] for token in tokens for ch in token).decode("utf-8")


# SmolLM2's vocabulary has no token for a few bytes (lead bytes 0xF1/0xF2, some C0 controls); text needing
# them cannot round-trip through this model's tokenizer.
REPRESENTABLE = st.characters(blacklist_categories=("Cs",), max_codepoint=0x3FFFF,
                              blacklist_characters="\x04\x06\x13\x14\x16\x1d")


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(text=st.text(alphabet=REPRESENTABLE, max_size=40))
def test_gguf_byte_level_round_trip(smol: Tokenizer, text: str) -> None:
    ids = smol.encode(text, add_special_tokens=False)
    assert smol.decode(ids) == text
    assert _byte_level_text([smol.id_to_token(i) for i in ids]) == text


@pytest.mark.slow
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(smol: Tokenizer, smol_reference: Any,
                                                 conversation: list[dict[str, str]],
                                                 add_generation_prompt: bool) -> None:
    expected_text = smol_reference.apply_chat_template(conversation, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)
    assert smol.render_chat(conversation, add_generation_prompt=add_generation_prompt) == expected_text
    assert smol.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == \
        reference_chat_ids(smol_reference, conversation, add_generation_prompt)


@pytest.mark.slow
def test_gguf_loads_from_metadata_quickly(gguf_path: Path, smol: Tokenizer) -> None:
    """Only the metadata is parsed: CPU time, not wall time, so a busy machine does not fail it."""
    import time

    start = time.process_time()
    Tokenizer.from_path(gguf_path)
    assert time.process_time() - start < 2.0


# ---------------------------------------------------------------------- SentencePiece-style HF directory


@pytest.fixture(scope="module", params=["strip", "metaspace"])
def sp_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sentencepiece_dir(tmp_path_factory.mktemp(f"sp-{request.param}"),
                                   decoder_style=request.param, chat_template=LLAMA2_TEMPLATE)


def test_sentencepiece_dir_matches_transformers(sp_dir: Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(sp_dir))
    tokenizer = Tokenizer.from_path(sp_dir)
    assert tokenizer.vocab_size == len(reference)
    assert tokenizer.bos_token_id == reference.bos_token_id
    assert tokenizer.eos_token_ids == (reference.eos_token_id,)
    assert set(reference.all_special_ids) <= set(tokenizer.all_special_ids)
    for text in [*TEXTS, *CORPUS]:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert ids[0] == tokenizer.bos_token_id
        plain = reference.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text, add_special_tokens=False) == plain
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip)
    for conversation in CONVERSATIONS:
        rendered = tokenizer.render_chat(conversation)
        expected = reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert rendered == expected
        expected_ids = reference_chat_ids(reference, conversation, True)
        assert tokenizer.apply_chat_template(conversation) == expected_ids


def test_tokenizer_json_path_loads_its_directory(sp_dir: Path) -> None:
    from_dir = Tokenizer.from_path(sp_dir)
    from_file = Tokenizer.from_path(sp_dir / "tokenizer.json")
    assert from_file.encode("Hello 你好") == from_dir.encode("Hello 你好")
    assert from_file.has_chat_template


def test_eos_ids_collect_generation_config_and_end_of_turn(tmp_path: Path) -> None:
    template = ("{% for m in messages %}{{ '<|turn|>' + m['role'] + '\\n' + m['content'] + '<|end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|turn|>assistant\\n' }}{% endif %}")
    directory = build_sentencepiece_dir(tmp_path / "tok", decoder_style="strip", chat_template=template,
                                        extra_special=("<|turn|>", "<|end|>", "<|tool|>"))
    tool_id = RustTokenizer.from_file(str(directory / "tokenizer.json")).token_to_id("<|tool|>")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, tool_id]}))
    tokenizer = Tokenizer.from_path(directory)
    expected = ("</s>", "<|tool|>", "<|end|>")
    assert tokenizer.eos_token_ids == tuple(tokenizer.token_to_id(t) for t in expected)


def test_chat_template_file_takes_precedence(tmp_path: Path) -> None:
    directory = build_sentencepiece_dir(tmp_path / "tok", decoder_style="strip",
                                        chat_template=LLAMA2_TEMPLATE)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    tokenizer = Tokenizer.from_path(directory)
    assert tokenizer.render_chat([{"role": "user", "content": "x"}]) == "<user>x"


def test_named_template_list_picks_default(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    directory = build_sentencepiece_dir(tmp_path / "tok", decoder_style="strip", chat_template=None)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": templates}))
    assert Tokenizer.from_path(directory).render_chat([{"role": "user", "content": "x"}]) == "DEFAULT"


# ---------------------------------------------------------------------- errors


def test_missing_paths_and_non_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        Tokenizer.from_path(tmp_path)
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="neither"):
        Tokenizer.from_path(stray)


def test_without_chat_template(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_path(build_sentencepiece_dir(tmp_path / "t", decoder_style="strip",
                                                            chat_template=None))
    assert not tokenizer.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_invalid_chat_template_is_rejected(tmp_path: Path) -> None:
    directory = build_sentencepiece_dir(tmp_path / "t", decoder_style="strip", chat_template="{% for m in %}")
    with pytest.raises(ValueError, match="chat_template"):
        Tokenizer.from_path(directory)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"content": "hi"}], r"messages\[0\]\.role: missing"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\]\.content: missing"),
        ([{"role": "user", "content": ["parts"]}], r"messages\[0\]\.content: must be a str"),
        ([{"role": 3, "content": "x"}], r"messages\[0\]\.role: must be a str"),
        (["hello"], r"messages\[0\]: must be a dict"),
        ("hello", r"messages: must be a list"),
    ],
)
def test_invalid_messages(tmp_path: Path, messages: Any, message: str) -> None:
    tokenizer = Tokenizer.from_path(build_sentencepiece_dir(tmp_path / "t", decoder_style="strip",
                                                            chat_template=LLAMA2_TEMPLATE))
    with pytest.raises(ValueError, match=message):
        tokenizer.apply_chat_template(messages)


def test_encode_rejects_non_text(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_path(build_sentencepiece_dir(tmp_path / "t", decoder_style="strip",
                                                            chat_template=None))
    with pytest.raises(ValueError, match="text"):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]
