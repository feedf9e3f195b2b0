"""A tiny Hugging Face tokenizer.json (+ tokenizer_config.json), trained here with the `tokenizers`
package: released checkpoints ship this form instead of a SentencePiece tokenizer.model."""

import json
import pathlib

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: the tiny preset's BOS 1 / EOS 2


def write_hf_tokenizer(directory: pathlib.Path, texts, vocab_size: int, config: bool = True,
                       metaspace: bool = False) -> tokenizers.Tokenizer:
    """directory/tokenizer.json (byte-level BPE whose post-processor adds <s>, as many released
    tokenizers do) and, with `config`, directory/tokenizer_config.json naming BOS and EOS. metaspace:
    SentencePiece-style pieces instead ("▁the"; decoding drops the space in front of the first one)."""
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    if metaspace:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = []
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL),
                                                             initial_alphabet=alphabet))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    if config:
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "add_bos_token": True}))
    return tokenizer
