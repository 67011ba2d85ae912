"""GGUF files of the other families (Qwen2, Qwen3, Mistral, Gemma 3) converted back to model folders.

Each file is written here from a tiny random transformers model the way llama.cpp's converter writes
it: the `{arch}.*` metadata keys, gguf's own tensor names for the architecture (its TensorNameMap, not
the table the converter reads), q and k rows permuted for `llama` only, Gemma's norms stored as 1 + w.
The converted folder must give back the model: config.json parsed by transformers' AutoConfig to the
same fields, every tensor, the same logits from transformers' model of the folder, and a tokenizer that
encodes as the model's own and as transformers' GGUF tokenizer do. Quantized files are compared with
transformers' own GGUF loading, tensor by tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, RopeScalingType, get_tensor_name_map
from gguf.quants import quantize
from safetensors.torch import load_file
from test_gguf import TEXTS, bpe_vocab, llama_cpp_permute, spm_vocab

from tsqp.errors import ModelError
from tsqp.model.gguf import gguf_model_dir
from tsqp.tee.tokenizer import TextTokenizer

Q = GGMLQuantizationType
ARCHS = {"qwen2": MODEL_ARCH.QWEN2, "qwen3": MODEL_ARCH.QWEN3, "llama": MODEL_ARCH.LLAMA, "gemma3": MODEL_ARCH.GEMMA3}
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}"
)
PROMPT = torch.arange(3, 43) * 7 % 300  # 40 ids below every vocabulary here


def tiny(**fields) -> dict:
    """A tiny config's fields: two layers of width 64 over bpe_vocab, and the family's own `fields`."""
    base = dict(vocab_size=len(bpe_vocab()[0]), hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    return base | dict(max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2) | fields


def qwen2(tied: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    return Qwen2ForCausalLM(Qwen2Config(**tiny(**heads, rope_theta=500000.0, tie_word_embeddings=tied)))


def qwen3(tied: bool = True):
    """head_dim 128 (wider than hidden / heads), the width transformers' GGUF loader assumes for Qwen3."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    return Qwen3ForCausalLM(Qwen3Config(**tiny(**heads, rope_theta=1000000.0, tie_word_embeddings=tied)))


def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    heads = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return MistralForCausalLM(MistralConfig(**tiny(**heads, sliding_window=8, tie_word_embeddings=False)))


def gemma3(**rope):
    """Seven layers: windowed ones (window 8, shorter than PROMPT) and the sixth global, as llama.cpp fixes;
    `rope` the global layers' rope_parameters beside their theta (Gemma 3 4B and up scale them linearly)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    heads = dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16)
    fields = tiny(**heads, num_hidden_layers=7, sliding_window=8, tie_word_embeddings=True)
    fields |= dict(vocab_size=len(gemma_vocab()[0]), bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if rope:
        full = {"rope_type": "default", "rope_theta": 1e6} | rope
        fields["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
    return Gemma3ForCausalLM(Gemma3TextConfig(**fields))


def gemma_vocab() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) laid out as Gemma's file: control tokens, user-defined newlines, tab and
    runs of spaces (spelled as spaces), 256 byte tokens, then pieces with \u2581 for spaces in merge order,
    their scores running the other way (Gemma's scores do not follow its merges)."""
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    user = ["\n", "\n\n", "  ", "   ", "\t"]
    pieces = spm_vocab()[0][259:-1]
    tokens = control + user + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [-1000.0] * (len(control) + len(user)) + [0.0] * 256 + [float(i) for i in range(len(pieces))]
    return tokens, scores, [3] * len(control) + [4] * len(user) + [6] * 256 + [1] * len(pieces)


def randomized(model):
    """The model in float32 with every weight random, norms included (their init is all ones or zeros)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.copy_(0.2 * noise if tensor.ndim == 1 else 0.25 * noise)
    return model.float().eval()


def theta(config, kind: str = "full_attention") -> float:
    params = config.rope_parameters
    return float((params.get(kind) or params)["rope_theta"])


def write_family_gguf(path: Path, model, arch: str, matrices=Q.F32) -> None:
    """`model` as llama.cpp's convert_hf_to_gguf.py writes it, with bpe_vocab's tokenizer."""
    config = model.config
    writer = GGUFWriter(path, arch)
    writer.add_name(type(model).__name__)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(theta(config))
    global_rope = config.rope_parameters.get("full_attention") or config.rope_parameters
    if global_rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(global_rope["factor"])
    if arch in ("qwen3", "gemma3"):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    else:
        width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_rope_dimension_count(width)
    if getattr(config, "sliding_window", None) and arch != "qwen2" and arch != "qwen3":
        writer.add_sliding_window(config.sliding_window)
    write_tokenizer(writer, gemma=arch == "gemma3")
    names = get_tensor_name_map(ARCHS[arch], config.num_hidden_layers)
    rng = np.random.default_rng(1)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem, suffix = name.rsplit(".", 1)
        data = tensor.numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1  # llama.cpp's Gemma3Model.modify_tensors
        if arch == "llama" and ("q_proj" in name or "k_proj" in name) and suffix == "weight":
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            data = llama_cpp_permute(data, heads)
        qtype = Q.F32 if data.ndim == 1 else (matrices(name, rng) if callable(matrices) else matrices)
        stored = quantize(data, qtype)
        writer.add_tensor(f"{names.get_name(stem)}.{suffix}", stored, raw_dtype=qtype if qtype != Q.F32 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tokenizer(writer: GGUFWriter, gemma: bool) -> None:
    """Qwen's byte-level vocabulary (`gpt2` model, `qwen2` split, merges, bos 1 not added), or Gemma's
    SentencePiece as llama.cpp writes it (`llama` model, scores and no merges, bos 2 added, no prefix space)."""
    tokens, extra, types = gemma_vocab() if gemma else bpe_vocab()
    writer.add_tokenizer_model("llama" if gemma else "gpt2")
    writer.add_tokenizer_pre("default" if gemma else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    (writer.add_token_scores if gemma else writer.add_token_merges)(extra)
    writer.add_bos_token_id(2 if gemma else 1)
    writer.add_eos_token_id(1 if gemma else 2)
    writer.add_add_bos_token(gemma)
    writer.add_chat_template(GEMMA_TEMPLATE if gemma else CHAT_TEMPLATE)
    if gemma:
        writer.add_unk_token_id(3)
        writer.add_pad_token_id(0)
        writer.add_add_space_prefix(False)


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TSQP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def converted(tmp_path: Path, model, arch: str, matrices=Q.F32) -> tuple[Path, Path]:
    """(the converted folder, the GGUF file) of `model` written as `arch`."""
    path = tmp_path / "gguf" / "m.gguf"
    path.parent.mkdir()
    write_family_gguf(path, model, arch, matrices)
    return gguf_model_dir(path, progress=False), path


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_parameters",
    "max_position_embeddings",
    "vocab_size",
    "tie_word_embeddings",
    "attention_bias",
    "sliding_window",
    "layer_types",
    "bos_token_id",
    "eos_token_id",
    "hidden_act",
    "hidden_activation",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)


def assert_same_model(folder: Path, model, atol: float = 0.0) -> None:
    """config.json read by AutoConfig states the model's fields; every tensor and the logits are the model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    assert type(config) is type(model.config)
    assert config.architectures == [type(model).__name__]
    for field in FIELDS:
        if hasattr(model.config, field):
            expected = getattr(model.config, field)
            expected = pytest.approx(expected) if isinstance(expected, float) else expected
            assert getattr(config, field) == expected, field
    tensors = folder_tensors(folder)
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    assert set(tensors) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(tensors[name], tensor, atol=atol, rtol=0, msg=name)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(PROMPT[None]).logits, model(PROMPT[None]).logits, atol=1e-5, rtol=0)


def assert_equals_transformers_gguf(folder: Path, path: Path) -> None:
    """Every converted tensor equals what transformers' own GGUF loading makes of the file."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    expected = reference.state_dict()
    tensors = folder_tensors(folder)
    if reference.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert set(tensors) == set(expected)
    for name, tensor in tensors.items():
        assert torch.equal(tensor.float(), expected[name]), name


MODELS = {"qwen2": qwen2, "qwen2-tied": lambda: qwen2(tied=True), "qwen3": qwen3, "qwen3-untied": lambda: qwen3(False)}


@pytest.mark.parametrize("name", MODELS)
def test_qwen_gives_back_the_model(tmp_path, name):
    arch = name.split("-")[0]
    model = randomized(MODELS[name]())
    folder, path = converted(tmp_path, model, arch)
    assert_same_model(folder, model)
    assert_equals_transformers_gguf(folder, path)
    raw = json.loads((folder / "config.json").read_text())
    assert (raw["model_type"], raw["architectures"]) == (arch, [type(model).__name__])


def mixed(name: str, rng) -> GGMLQuantizationType:
    return [Q.Q8_0, Q.Q4_0, Q.Q5_1, Q.F16][rng.integers(4)]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_quantized_qwen_equals_transformers(tmp_path, arch):
    model = randomized(qwen2() if arch == "qwen2" else qwen3())
    folder, path = converted(tmp_path, model, arch, matrices=mixed)
    assert_equals_transformers_gguf(folder, path)


def test_mistral_with_a_sliding_window(tmp_path):
    """llama.cpp files Mistral as `llama` with permuted q and k; its window makes it MistralForCausalLM."""
    model = randomized(mistral())
    folder, _ = converted(tmp_path, model, "llama")
    assert_same_model(folder, model)
    assert json.loads((folder / "config.json").read_text())["sliding_window"] == 8


def test_qwen_tokenizer_encodes_as_the_model_and_transformers(tmp_path):
    """Qwen's pre-tokenizer split (digits one at a time) is kept: the converted tokenizer encodes every text
    as Qwen2Tokenizer over the same vocabulary does, and as transformers' GGUF tokenizer does."""
    from transformers import AutoTokenizer, Qwen2Tokenizer

    tokens, merges, _ = bpe_vocab()
    folder, path = converted(tmp_path, randomized(qwen2()), "qwen2")
    own = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    own.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    own.add_tokens(["<think>"])
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = TextTokenizer(folder)
    for text in TEXTS + ["12345 and 2026-12-06"]:
        ids = tokenizer.encode(text)
        assert ids == own(text).input_ids == from_gguf(text).input_ids, text
    assert len(tokenizer.encode("12345")) == 5  # one digit a piece, where llama3's split takes three
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda w: w.add_tensor("blk.0.attn_output.bias", np.ones(64, np.float32)), "attn_output.bias"),
        (lambda w: w.add_tensor("blk.0.post_ffw_norm.weight", np.ones(64, np.float32)), "post_ffw_norm"),
    ],
    ids=["o-bias", "gemma-norm"],
)
def test_qwen2_refuses_what_it_has_no_place_for(tmp_path, cache_root, edit, fragment):
    path = tmp_path / "m.gguf"
    model = randomized(qwen2())
    original = GGUFWriter.write_header_to_file

    def with_extra(writer, *args, **kwargs):
        edit(writer)
        return original(writer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GGUFWriter, "write_header_to_file", with_extra)
        write_family_gguf(path, model, "qwen2")
    with pytest.raises(ModelError, match=fragment) as caught:
        gguf_model_dir(path, progress=False)
    assert "Qwen2" in str(caught.value) and "\n" not in str(caught.value)
    assert not cache_root.exists() or list(cache_root.iterdir()) == []


def test_gemma3_gives_back_the_model(tmp_path):
    """Norms shifted back by one (in float32: within its rounding of 1 + w), both window kinds with their
    own rope bases, the query scale; the same logits as the model over a prompt longer than the window."""
    model = randomized(gemma3())
    folder, path = converted(tmp_path, model, "gemma3")
    assert_same_model(folder, model, atol=1e-7)
    assert_equals_transformers_gguf(folder, path)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert (raw["rope_theta"], raw["rope_local_base_freq"], raw["sliding_window"]) == (1e6, 1e4, 8)


def test_gemma3_with_linear_rope_scaling_on_its_global_layers(tmp_path):
    """A file with rope scaling (linear, factor 8): the global layers scale, the windowed ones do not."""
    model = randomized(gemma3(rope_type="linear", factor=8.0))
    folder, _ = converted(tmp_path, model, "gemma3")
    assert_same_model(folder, model, atol=1e-7)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}


def test_quantized_gemma3_equals_transformers(tmp_path):
    folder, path = converted(tmp_path, randomized(gemma3()), "gemma3", matrices=mixed)
    assert_equals_transformers_gguf(folder, path)


def test_gemma_tokenizer_equals_transformers(tmp_path):
    """tokenizer.json is transformers' GGUF Gemma tokenizer serialized (spaces as \u2581 without a prefix,
    runs of spaces respelled, merges in file order, bos added); TextTokenizer encodes and decodes as it does
    and as GemmaTokenizer over the same vocabulary and merges does."""
    from transformers import AutoTokenizer, GemmaTokenizer

    folder, path = converted(tmp_path, randomized(gemma3()), "gemma3")
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert json.loads((folder / "tokenizer.json").read_text()) == json.loads(reference.backend_tokenizer.to_str())
    tokenizer = TextTokenizer(folder)
    texts = TEXTS + ["<start_of_turn>user\nthe   key\tvalue<end_of_turn>", "Question: the secret?\nAnswer:"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids[0] == 2 and ids == reference(text).input_ids, text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    respelled = ["\u2581" * len(t) if not t.strip() and " " in t else t for t in gemma_vocab()[0]]
    merges = json.loads(reference.backend_tokenizer.to_str())["model"]["merges"]
    own = GemmaTokenizer(vocab={t: i for i, t in enumerate(respelled)}, merges=[tuple(m) for m in merges])
    for text in [t for t in texts if "<" not in t]:  # `own` has no control tokens added
        assert tokenizer.encode(text)[1:] == own(text, add_special_tokens=False).input_ids, text
    assert tokenizer.encode("<end_of_turn>")[1:] == [6]
    chat = tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n"


SPLIT_MODELS = {
    "qwen2": (qwen2, "qwen2"),
    "qwen3": (qwen3, "qwen3"),
    "mistral": (mistral, "llama"),
    "gemma3": (gemma3, "gemma3"),
    "gemma3-linear": (lambda: gemma3(rope_type="linear", factor=8.0), "gemma3"),
}


@pytest.mark.parametrize("name", SPLIT_MODELS)
def test_the_split_runs_the_converted_file_as_the_model(tmp_path, name):
    """GGUF file -> converted folder -> the split (verified, in process): every position's logits within 1e-4
    of the model the file was written from (the prompt is longer than the windowed families' window)."""
    from support import in_process

    make, arch = SPLIT_MODELS[name]
    model = randomized(make())
    folder, _ = converted(tmp_path, model, arch)
    tee, _ = in_process(folder)
    tee.ops.open_session(PROMPT.shape[0])
    logits = tee.forward(PROMPT)
    tee.ops.close_session()
    with torch.inference_mode():
        expected = model(PROMPT[None]).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert tee.ops.checker.checks  # every product was checked
