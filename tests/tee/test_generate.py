"""Generation with the server-side KV cache against transformers' generate, the tokenizer, and the CLI.

Greedy decoding through TeeModel + an in-process engine must give exactly transformers' greedy tokens
for 32 new tokens on every config feature; sampling must repeat under one seed; `tsqp generate --json`
must print one JSON object and nothing else.
"""

from __future__ import annotations

import json

import pytest
from conftest import build_checkpoint, load_reference, run_tsqp, token_ids
from support import FEATURES, in_process, transformers_greedy

from tsqp.errors import ModelError, TsqpError
from tsqp.model.presets import CHAT_TEMPLATE, preset_path, write_tokenizer
from tsqp.tee.generate import generate
from tsqp.tee.sampling import SamplingOptions
from tsqp.tee.tokenizer import TextTokenizer, eos_token_ids

NEW_TOKENS = 32
GREEDY_FEATURES = ["gqa", "mqa", "head_dim", "rope_llama3", "tied", "attention_bias", "mlp_bias"]


@pytest.fixture(scope="module")
def gqa_model(checkpoints):
    return checkpoints("gen-gqa", seed=300, **FEATURES["gqa"])


@pytest.mark.parametrize("feature", GREEDY_FEATURES)
def test_greedy_equals_transformers_generate(checkpoints, feature):
    path = checkpoints("gen-" + feature, seed=200 + GREEDY_FEATURES.index(feature), **FEATURES[feature])
    prompt = token_ids(7, seed=GREEDY_FEATURES.index(feature))
    expected = transformers_greedy(load_reference(path), prompt, NEW_TOKENS)
    tee, engine = in_process(path)
    result = generate(tee, prompt.tolist(), NEW_TOKENS)
    assert len(expected) == NEW_TOKENS
    assert result.generated_ids == expected
    assert result.stop_reason == "length"
    assert result.prompt_ids == prompt.tolist()
    assert not engine.sessions, "the session outlived the generation"


def test_generation_stops_at_eos_and_includes_it(gqa_model):
    tee, _ = in_process(gqa_model)
    prompt = token_ids(5, seed=3).tolist()
    free = generate(tee, prompt, 20).generated_ids
    stop = free[4]
    first = free.index(stop)
    stopped = generate(tee, prompt, 20, eos_ids=[999, stop])
    assert stopped.generated_ids == free[: first + 1]
    assert stopped.stop_reason == "eos"
    assert stopped.decode_tokens == first


def test_one_new_token_is_prefill_only(gqa_model):
    tee, _ = in_process(gqa_model)
    result = generate(tee, [5, 6, 7], 1)
    assert len(result.generated_ids) == 1
    assert result.decode_tokens == 0 and result.decode_tokens_per_s == 0.0
    assert result.ttft_s > 0


def test_sampling_with_one_seed_repeats_and_another_seed_differs(gqa_model):
    tee, _ = in_process(gqa_model)
    prompt = token_ids(6, seed=4).tolist()

    def run(seed):
        return generate(tee, prompt, NEW_TOKENS, SamplingOptions(temperature=1.5, top_k=50, top_p=0.95, seed=seed))

    first, again, other = run(11), run(11), run(12)
    assert first.generated_ids == again.generated_ids
    assert first.generated_ids != other.generated_ids
    assert first.generated_ids != generate(tee, prompt, NEW_TOKENS).generated_ids  # not greedy in disguise


def test_sampled_text_repeats_with_a_tokenizer(tmp_path):
    path, _ = build_checkpoint(tmp_path / "with-tokenizer", seed=5, vocab_size=512)
    write_tokenizer(path, 512)
    tokenizer = TextTokenizer(path)
    tee, _ = in_process(path)
    prompt = tokenizer.encode("the trusted enclave")
    options = SamplingOptions(temperature=0.9, top_p=0.9, seed=3)
    texts = [tokenizer.decode(generate(tee, prompt, 24, options).generated_ids) for _ in range(2)]
    assert texts[0] == texts[1] and texts[0]


def test_capacity_past_the_model_positions_is_refused_before_any_call(gqa_model):
    tee, engine = in_process(gqa_model)
    limit = tee.config.max_position_embeddings
    with pytest.raises(TsqpError, match="exceed the model's .* positions"):
        generate(tee, [1] * 10, limit)
    assert not engine.sessions
    assert len(generate(tee, [1] * (limit - 3), 4).generated_ids) == 4  # exactly fits: the last token needs no slot


def test_a_failing_callback_still_frees_the_session(gqa_model):
    tee, engine = in_process(gqa_model)

    def explode(token):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        generate(tee, [1, 2, 3], 10, on_token=explode)
    assert not engine.sessions


def test_bad_requests_are_refused(gqa_model):
    tee, engine = in_process(gqa_model)
    with pytest.raises(TsqpError, match="at least 1"):
        generate(tee, [1, 2], 0)
    with pytest.raises(TsqpError, match="out of range"):
        generate(tee, [1, 10_000], 4)
    with pytest.raises(TsqpError, match="at least one token"):
        generate(tee, [], 4)
    assert not engine.sessions


# -- tokenizer ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder, 512)
    return folder


def test_tokenizer_round_trip_with_bos(tokenizer_dir):
    tokenizer = TextTokenizer(tokenizer_dir)
    ids = tokenizer.encode("the model splits the attention")
    assert ids[0] == 1  # <s> from tokenizer.json's post-processor
    assert tokenizer.encode("the model", add_special_tokens=False)[0] != 1
    assert tokenizer.decode(ids) == "the model splits the attention"


def test_chat_template_renders_like_transformers(tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    tokenizer = TextTokenizer(tokenizer_dir)
    reference = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": "what is a secret key"}]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    rendered = tokenizer.render_chat(messages)
    assert rendered == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n") and "</s>" in rendered
    assert tokenizer.chat_prompt_ids("what is a secret key") == tokenizer.encode(rendered, add_special_tokens=False)


def test_chat_template_raise_exception_and_sandbox(tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    refuse = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('needs a system turn') }}{% endif %}"
    config["chat_template"] = [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": refuse}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TsqpError, match="needs a system turn"):
        TextTokenizer(tmp_path).chat_prompt_ids("hi")
    (tmp_path / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ModelError, match="cannot be rendered"):
        TextTokenizer(tmp_path).chat_prompt_ids("hi")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="tokenizer.json is missing.*--token-ids"):
        TextTokenizer(tmp_path)


def test_eos_ids_from_generation_config_then_config(gqa_model, tmp_path):
    tee, _ = in_process(gqa_model)
    assert eos_token_ids(tmp_path, tee.config) == tee.config.eos_token_ids  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert eos_token_ids(tmp_path, tee.config) == (2, 7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert eos_token_ids(tmp_path, tee.config) == (9,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ModelError, match="eos_token_id"):
        eos_token_ids(tmp_path, tee.config)


# -- command line ------------------------------------------------------------------------------------


def test_cli_generate_json_on_the_tiny_preset():
    result = run_tsqp("generate", "--preset", "tiny", "--prompt", "the model", "--max-new-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert {"prompt_ids", "generated_ids", "text", "ttft_s", "decode_tokens_per_s"} <= set(out)
    path = preset_path("tiny")
    tokenizer = TextTokenizer(path)
    assert out["prompt_ids"] == tokenizer.encode("the model")
    assert out["text"] == tokenizer.decode(out["generated_ids"])
    assert out["ttft_s"] > 0 and out["decode_tokens_per_s"] >= 0
    tee, _ = in_process(path)
    expected = generate(tee, out["prompt_ids"], 12, eos_ids=eos_token_ids(path, tee.config))
    assert out["generated_ids"] == expected.generated_ids  # the CLI over a server subprocess == in process


def test_cli_prompt_without_tokenizer_fails_before_starting_a_server(gqa_model, capsys):
    from tsqp.cli import main

    assert main(["generate", "--model", str(gqa_model), "--prompt", "hello"]) == 1
    err = capsys.readouterr().err
    assert "tokenizer.json is missing" in err and "--token-ids" in err
    assert main(["generate", "--model", str(gqa_model), "--token-ids", "1,2", "--chat"]) == 1
    assert "--chat needs --prompt" in capsys.readouterr().err
