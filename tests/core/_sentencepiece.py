"""A tiny Llama-2-style tokenizer for tests: Metaspace pre-tokenizer and byte-fallback BPE, trained here."""

from __future__ import annotations

import json

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Café, naïve, résumé, jalapeño.",
    "你好世界，今天天气很好。",
    "I like 🙂 and 🎉 a lot; numbers 12345.",
]


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
