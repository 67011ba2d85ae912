"""Shared fixtures: tiny seeded Hugging Face checkpoints of each family and their transformers reference models.

Checkpoints are written with transformers' own config and model classes (`LlamaConfig` +
`LlamaForCausalLM.save_pretrained`, or another family's, FAMILY_CLASSES), so
the split path is always checked against the layout and math of the real library. Every parameter is
re-drawn after construction (transformers initialises biases to zero and RMSNorm gains to one, which
would let a bug that drops a bias or a norm gain pass unnoticed), and the weights are large enough that
attention is far from uniform (so a RoPE or masking bug changes the logits visibly).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import settings as hypothesis_settings

from tsqp.tuning import release_freed_memory

pytest_plugins = ["leftover_processes"]

# The README's test command is reproducible: hypothesis draws the same examples every run ("ci"); a random
# run, with its seed printed, is bench/fuzz.sh (--hypothesis-profile=random --hypothesis-seed=N).
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.register_profile("random", derandomize=False, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("TSQP_HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
# The caller's cache, before the session fixture points TSQP_CACHE at a fresh folder: where the real
# model (fetched and converted once per machine) is kept.
ORIGINAL_CACHE = os.environ.get("TSQP_CACHE") or str(Path.home() / ".cache" / "tsqp")

# The base shape of every test model: small enough for a 300-token eager forward in milliseconds.
BASE_CONFIG = dict(
    vocab_size=200,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
)
WEIGHT_STD = 0.25  # linear weights and biases
EMBED_STD = 1.0


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Re-draws every parameter from a seeded generator: norm gains around 1, everything else N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                param.copy_(EMBED_STD * noise)
            else:
                param.copy_(WEIGHT_STD * noise)


# family -> transformers' (config class, model class) names
FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


def build_checkpoint(path: Path, seed: int = 0, shard: bool = False, family: str = "llama", **overrides):
    """Writes a tiny checkpoint of the family to `path`; returns (path, config) with the transformers config."""
    import transformers

    config_class, model_class = (getattr(transformers, name) for name in FAMILY_CLASSES[family])
    torch.manual_seed(seed)
    config = config_class(**{**BASE_CONFIG, **overrides})
    model = model_class(config)
    randomize_(model, seed)
    path.mkdir(parents=True, exist_ok=True)
    if shard:
        model.save_pretrained(path, max_shard_size="20KB")
        assert (path / "model.safetensors.index.json").is_file(), "sharding did not produce an index"
        assert len(list(path.glob("model-*.safetensors"))) > 1
    else:
        model.save_pretrained(path)
        assert (path / "model.safetensors").is_file()
    return path, config


def load_reference(path: Path):
    """transformers' eager float32 model from the folder (its config's class), as the reference for the split
    logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """(T, vocab) float32 logits at every position."""
    return model(ids[None]).logits[0].float()


def split_logits(model_dir, call, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits of a fresh session over ids, through `call` (a Client or an InProcess engine)."""
    from tsqp.tee.compose import tee_model

    tee = tee_model(model_dir, call)
    tee.attach()
    tee.ops.open_session(ids.shape[0])
    logits = tee.forward(ids)
    tee.ops.close_session()
    return logits


def token_ids(n: int, vocab: int = BASE_CONFIG["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# -- environment -------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _test_environment(tmp_path_factory):
    """Quiet subprocess servers, a private preset cache, and no endpoint/model defaults from the caller."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TSQP_QUIET_SERVER", "1")
    mp.setenv("TSQP_CACHE", str(tmp_path_factory.mktemp("tsqp-cache")))
    for name in (
        "LLAMA_MODEL_PATH",
        "LLAMA_GPU_ENDPOINT",
        "LLAMA_IPC_PATH",
        "LLAMA_GPU_PORT",
        "LLAMA_GPU_DEVICE",
        "LLAMA_DTYPE",
    ):
        mp.delenv(name, raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="module", autouse=True)
def _heap_given_back():
    """Each test module starts from a collected heap with its free pages given back to the OS: the suite runs
    in one process, and a later module's peak (transformers loading Gemma 3's GGUF, some 3 GB) adds to
    whatever the earlier ones left in the allocator's arenas."""
    gc.collect()
    release_freed_memory()
    yield


# -- checkpoints -------------------------------------------------------------------------------------


class CheckpointFactory:
    """Builds each named checkpoint once per test session."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[str, Path] = {}
        self.references: dict[str, torch.nn.Module] = {}

    def __call__(self, name: str, seed: int = 0, shard: bool = False, **overrides) -> Path:
        if name not in self.cache:
            self.cache[name] = build_checkpoint(self.root / name, seed=seed, shard=shard, **overrides)[0]
        return self.cache[name]

    def reference(self, name: str):
        if name not in self.references:
            self.references[name] = load_reference(self.cache[name])
        return self.references[name]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def feature_model(checkpoints):
    """get(name) -> (folder, transformers reference) for each config feature of test_equivalence.FEATURES."""
    from support import FEATURES

    def get(name: str):
        path = checkpoints("feature-" + name, seed=list(FEATURES).index(name) + 100, **FEATURES[name])
        return path, checkpoints.reference("feature-" + name)

    return get


@pytest.fixture(scope="session")
def tiny_model(checkpoints) -> Path:
    """The default GQA test checkpoint (4 heads, 2 kv heads) used by the subprocess tests."""
    return checkpoints("tiny-gqa", seed=0, num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_reference(checkpoints, tiny_model):
    return checkpoints.reference("tiny-gqa")


@pytest.fixture(scope="session")
def other_model(checkpoints) -> Path:
    """Same shape as tiny_model, other seed: a different model with an identical config."""
    return checkpoints("tiny-gqa-seed1", seed=1, num_key_value_heads=2)


# -- subprocess helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tsqp(*args: str, env: dict | None = None, timeout: float = 120, cwd: Path | None = None):
    """`python -m tsqp ARGS` to completion; returns the CompletedProcess (text).

    A command still running after `timeout` seconds fails the test with the Python stacks of all its
    threads (faulthandler, triggered by SIGABRT), so a hang says where it hangs."""
    command = [sys.executable, "-X", "faulthandler", "-m", "tsqp", *map(str, args)]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            try:
                stdout, stderr = process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
            pytest.fail(f"`tsqp {' '.join(map(str, args))}` hung for {timeout} s; its stacks:\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_one_line_error(result, *fragments: str) -> str:
    """Non-zero exit, exactly one non-empty stderr line starting with 'tsqp: error:', no traceback."""
    lines = error_lines(result.stderr)
    assert result.returncode != 0, f"exit 0; stderr={result.stderr!r}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("tsqp: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def kill_process(process: subprocess.Popen, sig=signal.SIGKILL, timeout: float = 10) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    return process.wait(timeout=timeout)


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def rewrite_config(path: Path, edit) -> None:
    config_path = path / "config.json"
    raw = json.loads(config_path.read_text())
    edit(raw)
    config_path.write_text(json.dumps(raw, indent=2))


# -- markers: a suite a user can slice (pyproject.toml registers them) -----------------------------------

PROCESS_CALLS = ("run_tsqp(", "subprocess.", "ServerProcess(", "api_process(", "Popen(")
SLOW_MODULES = ("test_fuzz_server.py",)  # thousands of hypothesis examples, in process


def _source(obj) -> str:
    import inspect

    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _starts_processes(item) -> bool:
    """Whether the test, one of its fixtures, or a helper of its module that it names starts a process."""
    import types

    functions = [item.function]
    functions += [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
    module = vars(item.module)
    for function in list(functions):
        code = getattr(function, "__code__", None)
        names = code.co_names if code is not None else ()
        functions += [module[n] for n in names if isinstance(module.get(n), types.FunctionType)]
    return any(call in _source(f) for f in functions for call in PROCESS_CALLS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        if module == "test_real_model.py" or "smol" in item.fixturenames:
            item.add_marker(pytest.mark.real_model)
        if item.get_closest_marker("subprocess") is None and _starts_processes(item):
            item.add_marker(pytest.mark.subprocess)
        if (
            item.get_closest_marker("subprocess")
            or item.get_closest_marker("real_model")
            or item.get_closest_marker("gpu")
            or module in SLOW_MODULES
        ):
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config):
    profile = hypothesis_settings.get_current_profile_name()
    seed = config.getoption("hypothesis_seed", None)
    derandomized = hypothesis_settings.default.derandomize
    return f"hypothesis profile {profile!r}, derandomize={derandomized}, seed={seed} (bench/fuzz.sh: random seeds)"


def pytest_terminal_summary(terminalreporter):
    """The peak memory of the test process (ru_maxrss: KiB on Linux). Its children's figure is not shown: Linux
    carries a forked child's high-water mark across exec, so it would repeat the parent's."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    terminalreporter.write_line(f"peak memory of the test process: {own:.0f} MiB (ru_maxrss)")
