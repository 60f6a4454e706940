"""Tokenizers: `tokenizer.json` from a checkpoint directory (via the `tokenizers` library), or a
byte-level tokenizer with the Llama 4 special-token names for presets.

The byte tokenizer is a real `tokenizers` object (ids 0–255 = bytes, then the Llama 4 special
tokens at 256 + their offset from 200000, spec llama4.md §7.1), so it saves as `tokenizer.json`
and loads back — or into HF's `PreTrainedTokenizerFast` — like any other.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

LLAMA4_SPECIAL_BASE = 200000


def llama4_special_tokens(n: int = 128) -> list[str]:
    """The first `n` Llama 4 special tokens in id order (offset 0 = <|begin_of_text|>)."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
             "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    names += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)]
    names += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    names += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6, 67)]       # → offset 79
    names += ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
              "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
    names += [f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)]
    names += ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
    i = 7
    while len(names) < n:
        names.append(f"<|vision_reserved_special_token_{i}|>")
        i += 1
    return names[:n]


def byte_tokenizer(n_special: int = 128) -> Tokenizer:
    """Byte-level tokenizer: 256 byte ids, then `n_special` Llama 4 special tokens (vocab 256+n)."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ids equal byte values: order the 256 ByteLevel characters by the byte they encode
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(llama4_special_tokens(n_special))
    # like the hub tokenizer.json (spec §7.2): HF's `tokenizer(text)` prepends <|begin_of_text|>
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character table (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class TokenizerWrapper:
    """Thin convenience layer: encode/decode strings, special-token ids, stop ids."""

    def __init__(self, tok: Tokenizer, bos_token_id: int | None = None, stop_ids: list[int] | None = None):
        self.tok = tok
        self.bos_token_id = bos_token_id if bos_token_id is not None else tok.token_to_id("<|begin_of_text|>")
        default_stops = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom|>", "<|eot|>")]
        self.stop_ids = stop_ids if stop_ids is not None else [i for i in default_stops if i is not None]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a string, got {type(text).__name__}")
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=skip_special)

    def token_strings(self, ids) -> list[str]:
        """One display string per id (bytes decoded leniently), for token-level views."""
        return [self.tok.decode([int(i)], skip_special_tokens=False) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def save(self, directory: str | Path) -> None:
        self.tok.save(str(Path(directory) / "tokenizer.json"))


TOKENIZER_MAX_BYTES = 1 << 30     # Llama 4's tokenizer.json is ~27 MB


def load_tokenizer(directory: str | Path, config_bos: int | None = None, config_eos=None) -> TokenizerWrapper | None:
    """tokenizer.json from a checkpoint directory, or None when there is none."""
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        return None
    from workbench.safe_files import regular_file
    try:
        st = regular_file(path, "it", error=ValueError)       # a FIFO would block the reader for ever
    except ValueError as e:
        raise ValueError(f"{path}: not a valid tokenizer.json ({str(e).split(': ', 1)[-1]})") from None
    if st.st_size > TOKENIZER_MAX_BYTES:
        raise ValueError(f"{path}: not a valid tokenizer.json ({st.st_size} bytes, over the "
                         f"{TOKENIZER_MAX_BYTES} limit)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    stops = None
    if config_eos is not None:
        stops = list(config_eos) if isinstance(config_eos, list) else [config_eos]
    return TokenizerWrapper(tok, config_bos, stops)


def preset_tokenizer(config) -> TokenizerWrapper:
    n_special = config.vocab_size - 256
    if n_special < 19:
        raise ValueError(f"vocab_size={config.vocab_size} too small for the byte tokenizer (needs ≥ 275)")
    eos = config.eos_token_id
    return TokenizerWrapper(byte_tokenizer(min(n_special, 2048)), config.bos_token_id,
                            list(eos) if isinstance(eos, list) else [eos])

