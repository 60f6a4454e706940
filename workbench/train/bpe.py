"""A small byte-level BPE tokenizer trained with the `tokenizers` library, laid out like Llama 4's.

Layout (spec llama4.md §7.1): the learned vocabulary first (ids 0 … V−n−1, the 256 byte symbols
always included, so every string encodes), then the Llama 4 special tokens **in Llama 4's order**
at ids V−n … V−1, so `<|begin_of_text|>` = V−n plays the role of 200000, `<|end_of_text|>` = V−n+1
that of 200001, `<|eot|>` = V−n+8 that of 200008, and so on. The config's `bos_token_id`,
`eos_token_id` (end_of_text, eom, eot) and `pad_token_id` (finetune_right_pad) follow from that —
see `special_ids`.

Pre-tokenization: the Llama 3 split regex (Llama 4's is a longer variant with the same classes;
digits are split in groups of ≤ 3), then GPT-2 byte-level mapping. The post-processor prepends
`<|begin_of_text|>` like the hub tokenizer.json (spec §7.2).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from workbench.tokenizer import llama4_special_tokens

# Llama 3's pre-tokenizer pattern (meta-llama/Meta-Llama-3-8B tokenizer.json).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Offsets from Llama 4's first special id (200000) of the tokens with a role in the config.
BOS_OFFSET, EOS_OFFSETS, PAD_OFFSET = 0, (1, 7, 8), 18   # begin_of_text; end_of_text, eom, eot; finetune_right_pad


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, n_special: int = 128,
              min_frequency: int = 2, exact: bool = True) -> Tokenizer:
    """Train on `texts` (an iterable of strings); total vocabulary = `vocab_size` incl. specials.
    `exact=False` accepts fewer learned ids when the texts have fewer merges (a small closed
    vocabulary, as in the tiny-vlm's questions): the specials then follow the learned ids."""
    if n_special < PAD_OFFSET + 1:
        raise ValueError(f"n_special={n_special} must be ≥ {PAD_OFFSET + 1} to hold the Llama 4 role tokens")
    n_learned = vocab_size - n_special
    if n_learned < 256 + 1:
        raise ValueError(f"vocab_size={vocab_size} leaves {n_learned} learned ids; need > 256 (the byte alphabet)")
    tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_learned, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    # tokenizers parallelises with rayon; respect the caller's thread budget (shared machines)
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, os.cpu_count() or 1)))
    tok.train_from_iterator(texts, trainer=trainer)
    if exact and tok.get_vocab_size() != n_learned:     # too little text to learn every merge
        raise ValueError(f"corpus too small: learned {tok.get_vocab_size()} of {n_learned} ids "
                         f"(lower vocab_size or min_frequency)")
    tok.add_special_tokens(llama4_special_tokens(n_special))      # appended: ids n_learned … vocab_size−1
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def special_ids(tok: Tokenizer) -> dict:
    """Config fields for a tokenizer laid out as above: bos_token_id, eos_token_id (list), pad_token_id."""
    base = tok.token_to_id("<|begin_of_text|>")
    if base is None:
        raise ValueError("tokenizer has no <|begin_of_text|>: not a Llama 4-style tokenizer")
    return {"bos_token_id": base + BOS_OFFSET, "eos_token_id": [base + o for o in EOS_OFFSETS],
            "pad_token_id": base + PAD_OFFSET}
