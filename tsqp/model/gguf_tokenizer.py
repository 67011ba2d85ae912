"""The tokenizer of a GGUF file, rebuilt as a `tokenizers` tokenizer.json (with tokenizer_config.json and
generation_config.json) the way transformers' GGUF loader builds it, so both encode a text to the same ids.

`tokenizer.ggml.model` "gpt2" is byte-level BPE (its tokens and merges), "llama" SentencePiece (its
pieces and scores, as BPE with byte fallback); the chat template, bos and eos come from the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tsqp.errors import ModelError

_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
# How llama.cpp's pre-tokenizer names split text before byte-level BPE (transformers' GGUF tokenizer uses
# the same table); any other name gets GPT-2's own split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (  # Mistral Nemo, which llama.cpp files as a llama
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (  # Qwen2/2.5/3: llama3's, but one digit a piece
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "pixtral", "dbrx"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")  # SentencePiece without a prefix space, merges in file order


def write_tokenizer(folder: Path, path: Path, meta: dict[str, Any], config: dict) -> None:
    """generation_config.json, and tokenizer.json with tokenizer_config.json when the file has a vocabulary."""
    # generation stops at the end of a turn too, as llama.cpp's does, when the file names that token apart
    stops = [i for i in (config["eos_token_id"], meta.get("tokenizer.ggml.eot_token_id")) if isinstance(i, int)]
    generation = {"bos_token_id": config["bos_token_id"]}
    if stops:
        generation["eos_token_id"] = stops[0] if len(set(stops)) == 1 else stops
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if kind is None and not tokens:
        return  # no vocabulary: the model runs on token ids only
    if kind not in ("gpt2", "llama") or not tokens:
        raise ModelError(f"{path} has a tokenizer {kind!r}: TSQP reads 'gpt2' (BPE) and 'llama' (SentencePiece)")
    tokenizer, tokenizer_config = _tokenizer(path, meta, kind, tokens)
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def _tokenizer(path: Path, meta: dict[str, Any], kind: str, tokens: list[str]):
    """(tokenizers.Tokenizer, tokenizer_config) built as transformers' GGUF tokenizer builds them, so both
    encode a text to the same ids: its model, the file's control tokens and named ones (bos, eos, unk, pad)
    as special tokens, its user-defined ones as plain added tokens, and bos/eos added as the file says."""
    from tokenizers import AddedToken, processors

    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if not len(tokens) == len(types) == len(scores):
        raise ModelError(f"{path}: the tokenizer's token, type and score lists differ in length")
    ids = {key: meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "unknown", "padding")}
    named = {key: tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None for key, i in ids.items()}
    try:
        if kind == "gpt2":
            tokenizer, spelled = _byte_level(meta, tokens)
        elif meta.get("general.architecture") in _GEMMA_ARCHS:
            tokenizer, spelled = _gemma(meta, tokens)
        else:
            tokenizer, spelled = _sentencepiece(meta, tokens, scores)
    except Exception as exc:  # the Rust side raises plain Exceptions, on merges of tokens not in the vocabulary
        raise ModelError(
            f"{path} holds a tokenizer that cannot be built ({' '.join(str(exc).split())[:200]})"
        ) from None
    vocab = tokenizer.get_vocab()
    # a control token outside a byte-level alphabet is a llama.cpp mislabel: adding it would grow the vocabulary
    control = [t for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL and (not spelled or set(t) <= spelled)]
    special = control + [t for t in named.values() if t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    bos, eos = named["bos"], named["eos"]
    # llama.cpp adds bos to a SentencePiece vocabulary that does not say otherwise, and to no BPE one
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None)
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False) and eos is not None)
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    specials = [(bos, ids["bos"])] * add_bos + [(eos, ids["eos"])] * add_eos
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    tokenizer_config = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": named["unknown"],
        "pad_token": named["padding"],
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if isinstance(meta.get("tokenizer.chat_template"), str):
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, tokenizer_config


def _byte_level(meta: dict[str, Any], tokens: list[str]):
    """GPT-2 style byte-level BPE: (tokenizer, the byte alphabet every real token is spelled in)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges") or []]
    model = models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="")
    tokenizer = Tokenizer(model)
    split = _PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if split
        else pre_tokenizers.ByteLevel(add_prefix_space=False)
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, alphabet


def _sentencepiece(meta: dict[str, Any], tokens: list[str], scores: list[float]):
    """SentencePiece as BPE with byte fallback over the file's pieces, as transformers' LlamaTokenizer builds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer, None


def _gemma(meta: dict[str, Any], tokens: list[str]):
    """Gemma's SentencePiece as transformers' GemmaTokenizer builds it from a GGUF: spaces become \u2581 in
    a normalizer (no prefix space), a token of spaces only is looked up as that many \u2581, and the merges
    follow the order of the file's tokens (Gemma's scores do not follow its merge order)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    respelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(respelled)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, {t: -i for i, t in enumerate(respelled)})
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None, byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer, None


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a piece into two pieces, best score first."""
    merges = []
    for piece, score in scores.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        local = [(left, right, score) for left, right in splits if left in vocab and right in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that spells it in a byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
