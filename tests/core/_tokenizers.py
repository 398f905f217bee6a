"""Tiny tokenizers for tests, trained here in memory so that no test needs a downloaded one: Llama-2-style
(Metaspace pre-tokenizer, byte-fallback BPE) and GPT-2-style (byte-level BPE with a ChatML template, the kind
SmolLM2 ships)."""

from __future__ import annotations

import json

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer

from asyncllm.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Café, naïve, résumé, jalapeño.",
    "你好世界，今天天气很好。",
    "I like 🙂 and 🎉 a lot; numbers 12345.",
]

# Everyday English and chat words, so that engine-test prompts take about one token per short word.
CHAT_CORPUS = [
    *CORPUS,
    "Once upon a time there was a very long story that spans several pages of a book.",
    "system user assistant: You are a helpful assistant. Be brief and terse.",
    "Name three rivers. How long is it? And its source? Tell me a story, tell me everything.",
    "In 1492, the answer is 42 because numbers of the world are in rivers and prompts.",
    "Dear diary, today I wrote a summary: ingredients are flour, sugar, and eggs.",
    "Knock knock. Who's there? Bonjour, je m'appelle Marie. Story number one, two, three.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
]

# ChatML, as SmolLM2 and Qwen write it: the assistant turn ends with the special token <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")


def build_sentencepiece_backend(decoder_style: str, *, extra_special: tuple[str, ...] = ()) -> RustTokenizer:
    """``decoder_style`` "strip" (Replace + ByteFallback + Fuse + Strip) or "metaspace" (ByteFallback +
    Metaspace): the two decoders Llama-2-style checkpoints ship. BOS is prepended by the post-processor."""
    trainer_tokenizer = RustTokenizer(models.BPE(unk_token="<unk>"))
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=60, show_progress=False)
    trainer_tokenizer.train_from_iterator(CORPUS * 10, trainer)
    spec = json.loads(trainer_tokenizer.to_str())
    vocab = dict(spec["model"]["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    for token in extra_special:
        vocab.setdefault(token, len(vocab))
    backend = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                       fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    if decoder_style == "strip":
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        backend.decoder = decoders.Sequence([decoders.ByteFallback(),
                                             decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<unk>", "<s>", "</s>", *extra_special)])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return backend


def build_chat_tokenizer(vocab_size: int = 600) -> Tokenizer:
    """The engine and server tests' tokenizer, built like SmolLM2's: byte-level BPE (every byte is a token,
    so any text encodes and multi-byte characters split over several tokens), no BOS on plain prompts, a
    ChatML template whose turns end with the special ``<|im_end|>``, which is EOS."""
    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", *CHATML_SPECIALS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CHAT_CORPUS * 10, trainer)
    return Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                     pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def word_piece_only_bias(tokenizer: Tokenizer) -> dict[int, float]:
    """``logit_bias`` banning every token but whole words with their leading space (" river") that encode
    back to themselves after a newline, as a chat template writes an assistant reply."""
    newline = tokenizer.encode("\n", add_special_tokens=False)
    banned: dict[int, float] = {}
    for token_id in range(tokenizer.vocab_size):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if not (text.startswith(" ") and text[1:].isalpha()
                and tokenizer.encode("\n" + text, add_special_tokens=False) == [*newline, token_id]):
            banned[token_id] = -100.0
    return banned
