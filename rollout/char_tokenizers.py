"""Character-level tokenizers of the real transformers classes, built in memory (nothing downloaded): tests and
bench/gpu_check.py build tiny random pipelines with them.

Every prompt of lowercase letters, digits and spaces tokenizes without <unk>; other characters
(for instance SANA's long instruction prefix) become <unk>, which the tiny models do not mind.
"""

import string

from transformers import BertTokenizer, CLIPTokenizer, GemmaTokenizer, T5Tokenizer

CHARS = string.ascii_lowercase + string.digits


def clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """CLIP BPE without merges: one token per character, "</w>" marking a word's last one."""
    vocab = {}
    for char in CHARS:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def gemma_tokenizer() -> GemmaTokenizer:
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁", *CHARS])}
    return GemmaTokenizer(vocab=vocab, merges=[])


def blip_tokenizer() -> BertTokenizer:
    """BERT WordPiece with BLIP's extra tokens ([DEC] as bos, [ENC]), as BLIP's init_tokenizer adds them."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARS, *(f"##{c}" for c in CHARS)]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer
