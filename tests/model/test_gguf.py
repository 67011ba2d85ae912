"""GGUF files converted to model folders: tensors, config and tokenizer against what was written and
against transformers' own GGUF loader, and every refusal leaving an empty cache.

The files are tiny Llamas written here with gguf's GGUFWriter the way llama.cpp's converter writes them:
ggml tensor names, q and k rows permuted for llama.cpp's rope, weights quantized by gguf.quants (or, for
the k-quants gguf cannot quantize, random blocks with sane scales), norms in F32.
"""

from __future__ import annotations

import itertools
import json
import random
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import split_logits
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, RopeScalingType, get_tensor_name_map
from gguf.quants import dequantize, quantize

from tsqp.errors import ModelError
from tsqp.model.checkpoint import Checkpoint
from tsqp.model.gguf import gguf_model_dir
from tsqp.server.engine import Engine
from tsqp.tee.remote import InProcess
from tsqp.tee.tokenizer import TextTokenizer

Q = GGMLQuantizationType
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # what gguf.quants can write
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]  # read-only in gguf.quants: written as random blocks
K_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # f16 fields
SMALL = dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=2)
WIDE = dict(hidden=256, inter=256, layers=1, heads=4, kv_heads=2)  # rows a multiple of the k-quants' 256
TEXTS = [
    "Hello world",
    "  the secret key,\n\nand 12345 values: query/attention!  ",
    "tab\there; über naïve café — 東京 🙂 ok?",
    "<|im_start|>user\nverify the enclave<|im_end|>",
    "<think>hmm</think> done",
    "",
    " leading space and trailing space ",
]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
WORDS = (
    "the a model token layer trusted enclave server secret key value query attention softmax norm weight "
    "matrix vector split inference memory cache prefill decode sample text word fast slow safe check proof "
    "and of to in is it that for on with as by at from this be are was were not or but if then so we you"
).split()


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TSQP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def corpus() -> list[str]:
    rng = random.Random(0)
    words = WORDS + ["über", "café", "東京", "12", "345", "!", "?", ",", "\n"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + "." for _ in range(500)]


@cache
def bpe_vocab() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of a small byte-level BPE, three control tokens first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens + ["<think>"], merges, [3 if t in specials else 1 for t in tokens] + [4]


@cache
def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) shaped like a SentencePiece llama vocabulary: unk, bos, eos, 256 byte
    tokens, then pieces with \u2581 for spaces, best first; no merges (the reader derives them from the scores)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=200, show_progress=False))
    vocab = tokenizer.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<think>"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    return tokens, scores, [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]


def hf_weights(shape: dict, vocab: int, seed: int, tied: bool) -> dict[str, np.ndarray]:
    """float32 weights in transformers' names and layout."""
    rng = np.random.default_rng(seed)
    h, inter, hd = shape["hidden"], shape["inter"], shape["hidden"] // shape["heads"]
    q, kv = shape["heads"] * hd, shape["kv_heads"] * hd
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h)}
        shapes |= {p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)}
        shapes |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h)}
        shapes |= {p + "mlp.down_proj.weight": (h, inter)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, h)
    weights = {}
    for name, dims in shapes.items():
        noise = rng.standard_normal(dims).astype(np.float32)
        weights[name] = 1 + 0.2 * noise if len(dims) == 1 else (noise if "embed" in name else 0.25 * noise)
    return weights


def gguf_name(hf: str) -> str:
    """The ggml name gguf's own table gives a transformers llama tensor."""
    stem, suffix = hf.rsplit(".", 1)
    return f"{get_tensor_name_map(MODEL_ARCH.LLAMA, 8).get_name(stem)}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q and k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random k-quant blocks whose f16 scales are small and finite."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in K_SCALE_OFFSETS[qtype]:
        scale = rng.uniform(0.001, 0.01, (rows, cols // block)).astype(np.float16)
        raw[..., offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, cols // block * size)


def write_gguf(
    path: Path,
    matrices=Q.F32,
    shape: dict = SMALL,
    tokenizer: str = "gpt2",
    tied: bool = False,
    seed: int = 0,
    arch: str = "llama",
    add_bos: bool | None = None,
    extra=(),
) -> dict:
    """A tiny Llama GGUF; returns {hf name: (original float32, the float32 values the file now holds, its
    type)} in transformers' layout. `matrices` is a type or a function of the hf name giving one; norms are
    F32. `tokenizer` None writes no vocabulary at all (the embedding is still bpe_vocab's size)."""
    if tokenizer == "llama":
        tokens, scores, types = spm_vocab()
    else:
        tokens, merges, types = bpe_vocab()
    rng = np.random.default_rng(seed + 1)
    heads, kv_heads = shape["heads"], shape["kv_heads"]
    writer = GGUFWriter(path, arch)
    writer.add_block_count(shape["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(shape["hidden"])
    writer.add_feed_forward_length(shape["inter"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape["hidden"] // heads)
    writer.add_vocab_size(len(tokens))
    if tokenizer:
        writer.add_tokenizer_model(tokenizer)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_chat_template(CHAT_TEMPLATE)
    if tokenizer == "gpt2":  # as SmolLM2's file: bos <|im_start|>, eos <|im_end|>, no unk
        writer.add_token_merges(merges)
    elif tokenizer == "llama":
        writer.add_token_scores(scores)
        writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    for edit in extra:
        edit(writer)
    written = {}
    weights = hf_weights(shape, len(tokens), seed, tied)
    for hf in [n for n in weights if n != "model.norm.weight"] + ["model.norm.weight"]:  # norm last: no padding
        original = weights[hf]
        qtype = Q.F32 if original.ndim == 1 else (matrices(hf) if callable(matrices) else matrices)
        n_head = heads if "q_proj" in hf else kv_heads if "k_proj" in hf else None
        stored = llama_cpp_permute(original, n_head) if n_head else original
        if qtype in K_QUANTS:
            data = k_blocks(qtype, *stored.shape, rng)
        else:
            data = quantize(stored, qtype)
        writer.add_tensor(gguf_name(hf), data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        held = dequantize(data, qtype)
        written[hf] = (original, unpermute(held, n_head) if n_head else held, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def convert(path: Path, **kwargs) -> tuple[Path, dict, Checkpoint]:
    written = write_gguf(path, **kwargs)
    folder = gguf_model_dir(path, progress=False)
    return folder, written, Checkpoint(folder)


def refusal(path: Path, cache_root: Path) -> str:
    """The one-line ModelError converting `path` raises; the cache holds no folder, finished or staging."""
    with pytest.raises(ModelError) as caught:
        gguf_model_dir(path, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert not cache_root.exists() or list(cache_root.iterdir()) == []
    return message


STORED_AS = {Q.F16: torch.float16, Q.BF16: torch.bfloat16}
QUANTIZATION_ERROR = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2}  # of the largest |weight|; 4/5-bit: 0.1


@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS, ids=lambda q: q.name)
def test_tensors_are_what_the_file_holds(tmp_path, qtype):
    """Every tensor equals gguf's own dequantization of the stored bytes, in transformers' row order, and
    (for the types gguf can write) the float32 original within the quantization's error."""
    folder, written, checkpoint = convert(
        tmp_path / "m.gguf", matrices=qtype, shape=WIDE if qtype in K_QUANTS else SMALL
    )
    read = dict(checkpoint.tensors(written))
    assert set(checkpoint.where) == set(written)
    for name, (original, held, stored) in written.items():
        assert read[name].dtype == STORED_AS.get(stored, torch.float32), name
        assert torch.equal(read[name].float(), torch.from_numpy(held)), name
        if qtype in QUANTIZABLE:
            error = (read[name].float() - torch.from_numpy(original)).abs().max() / np.abs(original).max()
            assert error <= QUANTIZATION_ERROR.get(stored, 0.1), (name, float(error))
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == {Q.F16: "float16", Q.BF16: "bfloat16"}.get(qtype, "float32")


def test_q_and_k_rows_are_unpermuted(tmp_path):
    """An F32 file gives back the very q and k written, not llama.cpp's interleaved rows."""
    _, written, checkpoint = convert(tmp_path / "m.gguf", matrices=Q.F32)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        original = written[name][0]
        heads = SMALL["heads"] if "q_proj" in name else SMALL["kv_heads"]
        assert not np.array_equal(llama_cpp_permute(original, heads), original)
        assert np.array_equal(unpermute(llama_cpp_permute(original, heads), heads), original)
        assert torch.equal(checkpoint.tensor(name), torch.from_numpy(original))


def test_config(tmp_path):
    folder, _, checkpoint = convert(tmp_path / "m.gguf", matrices=Q.Q8_0)
    config = checkpoint.config
    assert (config.hidden_size, config.intermediate_size, config.num_layers) == (64, 128, 2)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.vocab_size == len(bpe_vocab()[0])
    assert config.rope_theta == 50000.0 and config.rope_type == "default"
    assert config.rms_norm_eps == pytest.approx(1e-5) and config.max_position_embeddings == 256
    assert not config.tie_word_embeddings and not config.attention_bias and not config.mlp_bias
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)
    assert json.loads((folder / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 256 and tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert checkpoint.has("lm_head.weight")


def test_tied_embeddings_when_the_file_has_no_output(tmp_path):
    _, written, checkpoint = convert(tmp_path / "m.gguf", matrices=Q.Q4_0, tied=True)
    assert "lm_head.weight" not in written
    assert checkpoint.config.tie_word_embeddings and not checkpoint.has("lm_head.weight")


def llama3_factors(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py rope_freqs for Meta's llama3 scaling (low 1, high 4, context 8192)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (8192 / wavelen - 1) / (4 - 1)
    middle = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192, factor, middle)).astype(np.float32)


@pytest.mark.parametrize(
    "edit, scaling",
    [
        (lambda w: w.add_tensor("rope_freqs.weight", np.ones(8, np.float32)), None),
        (lambda w: w.add_tensor("rope_freqs.weight", llama3_factors(16, 50000.0, 8.0)), ("llama3", 8.0)),
        (lambda w: (w.add_rope_scaling_type(RopeScalingType.LINEAR), w.add_rope_scaling_factor(4.0)), ("linear", 4.0)),
        (lambda w: w.add_rope_scaling_type(RopeScalingType.NONE), None),
    ],
    ids=["rope_freqs-ones", "rope_freqs-llama3", "linear", "none"],
)
def test_rope_scaling(tmp_path, edit, scaling):
    _, _, checkpoint = convert(tmp_path / "m.gguf", extra=[edit])
    config = checkpoint.config
    if scaling is None:
        assert config.rope_type == "default"
    else:
        assert (config.rope_type, config.rope_param("factor")) == scaling
    if config.rope_type == "llama3":
        assert config.rope_param("original_max_position_embeddings") == 8192
        assert (config.rope_param("low_freq_factor"), config.rope_param("high_freq_factor")) == (1.0, 4.0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tokenizer_equals_transformers(tmp_path, kind):
    """tokenizer.json is transformers' GGUF tokenizer, serialized: same model, added tokens, pre-tokenizer,
    decoder and post-processor; TextTokenizer encodes and decodes every text as transformers does."""
    from transformers import AutoTokenizer

    path = tmp_path / "m.gguf"
    folder, _, _ = convert(path, tokenizer=kind, add_bos=False if kind == "gpt2" else None)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert json.loads((folder / "tokenizer.json").read_text()) == json.loads(reference.backend_tokenizer.to_str())
    tokenizer = TextTokenizer(folder)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference(text).input_ids, text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        if kind == "gpt2" and "<|" not in text:  # byte-level BPE gives back every text without special tokens
            assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<think>")[-1] == len(bpe_vocab()[0] if kind == "gpt2" else spm_vocab()[0]) - 1
    assert (tokenizer.bos_token, tokenizer.eos_token) == (
        ("<|im_start|>", "<|im_end|>") if kind == "gpt2" else ("<s>", "</s>")
    )
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize("kind, add_bos", [("gpt2", None), ("gpt2", True), ("llama", None), ("llama", False)])
def test_add_bos_flag(tmp_path, kind, add_bos):
    """bos is added when the file says so; absent the flag, to SentencePiece vocabularies only (as llama.cpp
    and transformers do)."""
    from transformers import AutoTokenizer

    path = tmp_path / "m.gguf"
    folder, _, _ = convert(path, tokenizer=kind, add_bos=add_bos)
    expected = add_bos if add_bos is not None else kind == "llama"
    ids = TextTokenizer(folder).encode("the key")
    assert (ids[0] == 1) == expected
    assert ids == AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)("the key").input_ids
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] == expected


def test_logits_equal_transformers(tmp_path):
    """The split forward pass over the converted folder against transformers' model from the same GGUF,
    for a file of mixed quantized types with tied embeddings."""
    from transformers import AutoModelForCausalLM

    kinds = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16]
    path = tmp_path / "m.gguf"
    picks = itertools.cycle(kinds)
    folder, written, _ = convert(path, matrices=lambda name: next(picks), tied=True, seed=3)
    assert {stored for _, _, stored in written.values()} == {Q.F32, *kinds}
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.randint(0, len(bpe_vocab()[0]), (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(ids[None]).logits[0]
    got = split_logits(folder, InProcess(Engine(str(folder))), ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_file_without_a_vocabulary_runs_on_token_ids(tmp_path):
    folder, _, checkpoint = convert(tmp_path / "m.gguf", tokenizer=None)
    assert not (folder / "tokenizer.json").exists() and checkpoint.config.vocab_size == len(bpe_vocab()[0])
    with pytest.raises(ModelError, match="--token-ids"):
        TextTokenizer(folder)


def test_second_call_reuses_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    write_gguf(path, matrices=Q.Q8_0)
    folder = gguf_model_dir(path, progress=True)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("converted again")

    with monkeypatch.context() as patch:
        patch.setattr("tsqp.model.gguf._convert", no_conversion)
        assert gguf_model_dir(path, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    (folder / "config.json").unlink()  # a folder without config.json is not finished: converted anew
    assert gguf_model_dir(path, progress=False) == folder and (folder / "config.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_shards_past_the_shard_size(tmp_path, monkeypatch):
    monkeypatch.setattr("tsqp.model.gguf.SHARD_BYTES", 40_000)
    folder, written, checkpoint = convert(tmp_path / "m.gguf", matrices=Q.F32)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(checkpoint.files) > 2 and set(index["weight_map"]) == set(written)
    for name, tensor in checkpoint.tensors(written):
        assert torch.equal(tensor, torch.from_numpy(written[name][1])), name


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(arch="gpt2"), "'gpt2'"),
        (dict(extra=[lambda w: w.add_expert_count(8)]), "mixture-of-experts"),
        (dict(extra=[lambda w: w.add_rope_scaling_type(RopeScalingType.YARN)]), "'yarn'"),
        (dict(extra=[lambda w: w.add_tensor("rope_freqs.weight", np.full(8, 3.0, np.float32))]), "rope_freqs"),
        (dict(extra=[lambda w: w.add_tensor("blk.0.attn_q_norm.weight", np.ones(16, np.float32))]), "attn_q_norm"),
        (dict(extra=[lambda w: w.add_tensor("blk.0.attn_q.bias", np.ones(64, np.float32))]), "biases"),
        (dict(extra=[lambda w: w.add_key_length(32)]), "rotates part of each head"),
        (dict(matrices=lambda name: Q.F32 if "down" not in name else Q.I8), "'blk.0.ffn_down.weight' is stored as I8"),
    ],
    ids=["gpt2", "moe", "yarn", "rope_freqs", "unknown-tensor", "partial-bias", "partial-rope", "i8"],
)
def test_refusals(tmp_path, monkeypatch, cache_root, options, fragment):
    path = tmp_path / "m.gguf"
    with monkeypatch.context() as patch:  # gguf.quants cannot write I8: hand the writer int8 values directly
        patch.setattr(__name__ + ".quantize", lambda data, qtype: data.astype(np.int8) if qtype == Q.I8 else data)
        patch.setattr(__name__ + ".dequantize", lambda data, qtype: data.astype(np.float32))
        write_gguf(path, **options)
    assert fragment in refusal(path, cache_root)


@pytest.mark.parametrize("cut", ["half", "4 bytes", "header", "magic only"])
def test_truncated_file(tmp_path, cache_root, cut):
    path = tmp_path / "m.gguf"
    write_gguf(path, matrices=Q.Q4_1)
    data = path.read_bytes()
    keep = {"half": len(data) // 2, "4 bytes": len(data) - 4, "header": 30, "magic only": 4}[cut]
    path.write_bytes(data[:keep])
    assert "truncated" in refusal(path, cache_root)


def test_not_a_gguf_file(tmp_path, cache_root):
    path = tmp_path / "m.gguf"
    path.write_text("not a model")
    assert "not a GGUF file" in refusal(path, cache_root)
    assert "cannot read" in refusal(tmp_path / "missing.gguf", cache_root)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_dequantized_a_few_rows_at_a_time(tmp_path, monkeypatch, qtype):
    """Rows dequantized in blocks (here three rows of 64 values, or one of 128) give the values gguf's
    dequantization of the whole tensor gives."""
    monkeypatch.setattr("tsqp.model.gguf._DEQUANTIZE_BYTES", 3 * 64 * 4)
    _, written, checkpoint = convert(tmp_path / "m.gguf", matrices=qtype)
    for name, (_, held, _) in written.items():
        assert torch.equal(checkpoint.tensor(name).float(), torch.from_numpy(held)), name
