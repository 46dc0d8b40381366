"""A byte-level BPE tokenizer for the ``tiny`` default, trained with Hugging Face ``tokenizers``.

Digits are split one per token (so numbers are compared digit by digit, as in Llama's tokenizer);
``<|endoftext|>`` is the end-of-text and padding token. Training on the tiny tasks' text takes
well under a second; the trained tokenizer ships with the ``tiny`` checkpoints.
"""
from __future__ import annotations

from collections.abc import Iterable

END_OF_TEXT = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A ``transformers.PreTrainedTokenizerFast`` trained on ``texts`` with ``vocab_size`` entries.

    The vocabulary holds the 256 byte symbols, ``<|endoftext|>`` and the BPE merges learnt from the texts
    (fewer than ``vocab_size`` if the texts run out of pairs to merge).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)
