"""Named model shapes that write a seeded random-weight checkpoint in the Hugging Face layout.

No model can be downloaded on the machines this project is built on, so benchmarks and demos make
their own: config.json, safetensors weights (sharded with an index past one shard), a byte-level BPE
tokenizer.json trained on a fixed corpus, tokenizer_config.json with a chat template, and
generation_config.json. The folder is written once into the cache and reused.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors.torch import save_file

from tsqp import env
from tsqp.errors import TsqpError

PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=4096,
        storage_dtype="float32",
    ),
    # The seed's model: TinyLlama-1.1B (stored in bfloat16 like the published checkpoint).
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        storage_dtype="bfloat16",
    ),
}
SHARD_BYTES = 1 << 30
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_WORDS = (
    "the a model token layer trusted enclave server secret key value query attention softmax norm weight "
    "matrix vector split inference memory cache prefill decode sample text word fast slow safe check proof "
    "random seed step time byte share host device graph round trip shared arena verify tensor head rope "
    "and of to in is it that for on with as by at from this be are was were not or but if then so we you"
).split()


def cache_dir() -> Path:
    return env.read("TSQP_CACHE") / "presets"


def preset_path(name: str) -> Path:
    """The preset's checkpoint folder, written on first use."""
    if name not in PRESETS:
        raise TsqpError(f"unknown preset {name!r}: one of {', '.join(PRESETS)}")
    path = cache_dir() / name
    if not (path / "config.json").is_file():
        write_preset(name, path)
    return path


def write_preset(name: str, path: Path, seed: int = 0) -> None:
    spec = dict(PRESETS[name])
    storage = getattr(torch, spec.pop("storage_dtype"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(storage).removeprefix("torch."),
        **spec,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=path.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        write_tokenizer(staging, config["vocab_size"])
        write_weights(staging, config, storage, seed, label=name)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def weight_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_weights(folder: Path, config: dict, storage: torch.dtype, seed: int, label: str) -> None:
    generator = torch.Generator().manual_seed(seed)
    shapes = weight_shapes(config)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    with Progress(transient=True) as progress:
        task = progress.add_task(f"writing preset {label}", total=len(shapes))
        for name, shape in shapes:
            if len(shape) == 1:  # RMSNorm gains near 1
                tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
            else:
                tensor = torch.randn(shape, generator=generator).mul_(0.02)
            tensor = tensor.to(storage)
            if shard_bytes + tensor.nbytes > SHARD_BYTES and shards[-1]:
                shards.append({})
                shard_bytes = 0
            shards[-1][name] = tensor
            shard_bytes += tensor.nbytes
            progress.advance(task)
        if len(shards) == 1:
            save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
            return
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / file, metadata={"format": "pt"})
            for name, tensor in shard.items():
                weight_map[name] = file
                total += tensor.nbytes
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on a fixed corpus: real text in, real text out, ids below vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 1024),
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20))) + "." for _ in range(2000)]
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 4096,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
        )
    )
