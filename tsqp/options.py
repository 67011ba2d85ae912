"""Typed option groups: each field is also a command-line flag, so the CLI and the options cannot drift.

As in litgpt, a dataclass field carries its flag in its metadata (`option`): the flag's name (from the
field's by default), help, choices, and the environment variable (tsqp/env.py) whose value is the
flag's default when the command starts. `add_options` makes a parser's flags from a group;
`from_args` makes the group back from the parsed flags. `RunOptions` is what every client command (`logits`,
`generate`, `bench`, `diagnose`, `api`) hands to tee/runner.py; the other groups are the flags of one command each.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsqp import env
from tsqp.attest.verify import INTEL_PCS_URL
from tsqp.model.sources import model_names
from tsqp.tee.launcher import DEFAULT_START_TIMEOUT_S
from tsqp.tee.private import PAD_BITS
from tsqp.wire.client import CONNECT_TIMEOUT_S, REPLY_TIMEOUT_S
from tsqp.wire.protocol import FLOAT_DTYPES
from tsqp.wire.transport import endpoint_from_env


def option(
    help: str,
    default: Any = None,
    *,
    flag: str | None = None,
    env_var: str | None = None,
    env_default: Callable[[], Any] | None = None,
    choices: tuple | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    required: bool = False,
    exclusive: str | None = None,
) -> Any:
    """A dataclass field that is a flag. flag: its name (default --FIELD-NAME; no dashes: positional).
    env_var: the variable whose value is the flag's default at start (its registered default is the
    field's); env_default: a function that gives it. parse: the flag's type (default: the default's,
    for int and float). exclusive: fields with the same name form one required mutually exclusive group."""
    if env_var is not None:
        default = env.BY_NAME[env_var].default
    metadata = {"help": help, "flag": flag, "env_var": env_var, "env_default": env_default, "choices": choices}
    metadata.update(parse=parse, metavar=metavar, required=required, exclusive=exclusive)
    return field(default=default, metadata=metadata)


def flag_fields(group: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(group) if "help" in f.metadata]


def add_options(parser: argparse.ArgumentParser, group: type) -> None:
    """Adds a group's flags to a parser, their defaults read from the environment now."""
    exclusive: dict[str, Any] = {}  # name -> its mutually exclusive group
    for f in flag_fields(group):
        meta, kwargs = f.metadata, _flag_kwargs(f)
        name = meta["flag"] or "--" + f.name.replace("_", "-")
        if not name.startswith("-"):  # positional: its name is its dest, and it has no default
            del kwargs["default"]
            parser.add_argument(name, **kwargs)
            continue
        target = parser
        if meta["exclusive"] is not None:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = parser.add_mutually_exclusive_group(required=True)
            target = exclusive[meta["exclusive"]]
        elif meta["required"]:
            kwargs["required"] = True
        target.add_argument(name, dest=f.name, **kwargs)


def _flag_kwargs(f: dataclasses.Field) -> dict[str, Any]:
    """add_argument's help, default (from the environment where the field names a variable), action or
    type, choices and metavar for one field."""
    meta = f.metadata
    if meta["env_var"] is not None:
        default = env.read(meta["env_var"])
    else:
        default = meta["env_default"]() if meta["env_default"] is not None else f.default
    kwargs = {"help": meta["help"], "default": default}
    if isinstance(f.default, bool):  # --flag, or --flag/--no-flag when it is on by default
        kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
    elif (parse := meta["parse"] or _number_type(f.default)) is not None:
        kwargs["type"] = parse
    for key in ("choices", "metavar"):
        if meta[key] is not None:
            kwargs[key] = meta[key]
    return kwargs


def _number_type(default: Any) -> type | None:
    return type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None


def from_args(group: type, args: argparse.Namespace, **given: Any) -> Any:
    """The group made from parsed flags (its other fields from `given`)."""
    return group(**{f.name: getattr(args, f.name) for f in flag_fields(group)}, **given)


def optional_path(text: str) -> Path | None:
    return Path(text) if text else None


# -- fields that several groups share: each flag is written once ------------------------------------


def device_option() -> Any:
    return option(
        "where the server computes: cpu or cuda:N (default: $LLAMA_GPU_DEVICE or cpu)", env_var="LLAMA_GPU_DEVICE"
    )


def dtype_option() -> Any:
    return option(
        "server weights and wire dtype (default: $LLAMA_DTYPE or float32)", env_var="LLAMA_DTYPE", choices=FLOAT_DTYPES
    )


def pads_dir_option(parse: Callable[[str], Any] | None = None) -> Any:
    return option(
        "private mode's pad pools and their key (default: $TSQP_PADS_DIR or $TSQP_CACHE/pads)",
        env_var="TSQP_PADS_DIR",
        metavar="DIR",
        parse=parse,
    )


def curve_keys_option(side: str, parse: Callable[[str], Any] | None = None) -> Any:
    return option(
        f"authenticate and encrypt the link with CurveZMQ using the {side} keys in DIR, "
        "written by `tsqp keys DIR` (default: $TSQP_CURVE_KEYS)",
        env_var="TSQP_CURVE_KEYS",
        metavar="DIR",
        parse=parse,
    )


@dataclass
class ModelFlags:
    """Which model: every command that loads one takes these."""

    model: str | None = option(
        "a Hugging Face Llama folder, a GGUF file (converted once into the cache) or a preset name "
        f"({', '.join(model_names())}) (default: $LLAMA_MODEL_PATH)",
        env_var="LLAMA_MODEL_PATH",
    )
    preset: str | None = option(
        "the same as --model NAME: a random-weight shape written on first use, or a real model fetched",
        choices=tuple(model_names()),
    )


@dataclass
class RunOptions:
    """How a TEE client reaches its server and checks it: every client command's flags."""

    model_dir: Path
    connect: str | None = option(
        "a running server (ipc://PATH or tcp://HOST:PORT; default: $LLAMA_GPU_ENDPOINT, $LLAMA_IPC_PATH, "
        "$LLAMA_GPU_PORT); without one a private server is started",
        env_default=endpoint_from_env,
    )
    timeout_s: float = option(
        f"seconds to wait for one reply (default {REPLY_TIMEOUT_S:g})",
        REPLY_TIMEOUT_S,
        flag="--timeout",
        metavar="TIMEOUT",
    )
    connect_timeout_s: float = option(
        "seconds to wait for the server (--connect, --helper) to take the connection at all "
        f"(default {CONNECT_TIMEOUT_S:g})",
        CONNECT_TIMEOUT_S,
        flag="--connect-timeout",
        metavar="SECONDS",
    )
    start_timeout_s: float = option(
        f"seconds to wait for a private server to load its weights (default {DEFAULT_START_TIMEOUT_S:g})",
        DEFAULT_START_TIMEOUT_S,
        flag="--start-timeout",
        metavar="START_TIMEOUT",
    )
    transport: str = option(
        "bulk tensors through a /dev/shm arena (shm) or in ZeroMQ frames (zmq); auto: shm when the server is on "
        "this host",
        env_var="TSQP_TRANSPORT",
        choices=("auto", "shm", "zmq"),
    )
    arena_name: str | None = option(
        "fixed arena file name in /dev/shm (tsqp-...), e.g. one listed in a Gramine manifest",
        env_var="TSQP_ARENA_NAME",
    )
    curve_keys: Path | None = curve_keys_option("client (client.key_secret, server.key)", parse=optional_path)
    doorbell: bool = option(
        "lone small requests through the arena's doorbell (default); --no-doorbell: always ZeroMQ", True
    )
    pipeline: str = option(
        "the TEE works while the server computes: attention by query chunks, a prefill's checks during the next "
        "call; auto: on when the server computes apart from the TEE's cores (a GPU, another host, other CPUs)",
        env_var="TSQP_PIPELINE",
        choices=("auto", "on", "off"),
    )
    attention: str = option(
        "plain split's attention: server (5 calls a layer), tee (own KV cache: 4, fused 1), decode (prefill: server)",
        "auto",
        choices=("auto", "server", "tee", "decode"),
    )
    verify: bool = option(
        "check every server result with Freivalds' test (default); --no-verify to measure without", True
    )
    private: bool = option(
        "private mode: embedding and attention in the TEE, every linear input masked with a fresh one-time pad; "
        "the server never sees the prompt, the activations or the logits (default: $TSQP_PRIVATE)",
        env_var="TSQP_PRIVATE",
    )
    helper: str | None = option(
        "private mode: a second `tsqp serve`, run by another party, computes the pads from their seeds (the two "
        "servers must not collude); default: pads precomputed in the TEE (`tsqp pads`)",
        env_var="TSQP_HELPER",
        metavar="ENDPOINT",
    )
    helper_curve_keys: Path | None = option(
        "CurveZMQ keys for the helper link (client.key_secret and the helper's server.key); required for a "
        "tcp:// helper",
        env_var="TSQP_HELPER_CURVE_KEYS",
        metavar="DIR",
        parse=optional_path,
    )
    pad_bits: int = option(
        f"private mode: pads 2^BITS times each linear's calibrated largest input (default {PAD_BITS}; "
        "docs/threat-model.md has the error and leakage table)",
        PAD_BITS,
    )
    pads_dir: Path | None = pads_dir_option(parse=optional_path)
    device: str = device_option()  # for the private server
    dtype: str = dtype_option()  # for the private server


@dataclass
class ServeFlags:
    device: str = device_option()
    dtype: str = dtype_option()
    listen: str | None = option(
        "ipc://PATH or tcp://HOST:PORT (default: $LLAMA_GPU_ENDPOINT, $LLAMA_IPC_PATH, $LLAMA_GPU_PORT, else a "
        "per-user ipc path)"
    )
    max_cache_mb: int = option("KV cache memory cap over all sessions", 8192)
    max_memory_mb: int = option(
        "the server's memory budget: a request that would take it past this is refused, the server goes on "
        "(default: $TSQP_MAX_MEMORY_MB, else 80%% of the host's memory or of its cgroup's limit)",
        env_var="TSQP_MAX_MEMORY_MB",
    )
    idle_timeout: float = option("seconds before an idle session is freed", 600.0)
    batch_hold_ms: float | None = option(
        "how long a batchable request may wait for another client's same op, when that client is known to be on "
        "its way (a lone client never waits); 0: batch only what is queued (default $TSQP_BATCH_HOLD_MS or 10)",
        parse=float,
        metavar="MS",
    )
    private_only: bool = option(
        "hold only private mode's float64 weights and refuse plain-mode calls (half the memory of both); a "
        "private client's own server runs so",
        False,
    )
    tensor_parallel: int = option(
        "shard the weights over N ranks (GPUs cuda:K..K+N-1 or shares of the CPU cores) with torch.distributed; "
        "on one host the ranks are started here, across hosts by torchrun (README); default 1",
        1,
        metavar="N",
    )
    curve_keys: str | None = curve_keys_option("server (server.key_secret; clients admitted from allowed/)")


@dataclass
class LogitsFlags:
    token_ids: str = option("comma-separated token ids, e.g. 1,2,3", required=True)
    out: str = option("output .npy file", required=True)


@dataclass
class GenerateFlags:
    prompt: str | None = option("text, tokenized with the checkpoint's tokenizer.json", exclusive="prompt")
    token_ids: str | None = option("comma-separated prompt token ids, e.g. 1,2,3", exclusive="prompt")
    chat: bool = option("wrap --prompt as one user turn in the checkpoint's chat template", False)
    max_new_tokens: int = option("stop after this many tokens (default 128)", 128)
    temperature: float = option("0 is greedy (the default)", 0.0)
    top_k: int = option("sample among the k most likely tokens (0: off)", 0)
    top_p: float = option("sample among the smallest set of tokens whose probability reaches p (1: off)", 1.0)
    seed: int = option("sampling seed: the same seed gives the same text", 0)
    json: bool = option("print one JSON object (ids, text, timings) instead of streaming the text", False)


@dataclass
class BenchFlags:
    tokens: int = option("prompt length (default 128)", 128)
    decode: int = option("then time this many greedy decode steps with the server's KV cache (default 0: none)", 0)
    compare: bool = option(
        "also time transformers' monolithic prefill (sdpa and eager), and generate with --decode, in the same run",
        False,
    )
    json_path: str | None = option("write the figures to this JSON file", flag="--json")
    sweep: str | None = option(
        "more prompt lengths to time, e.g. 128,512,1024,2048 (with --compare: transformers too, each length)"
    )
    trace: str | None = option("write a Chrome/Perfetto trace of the timed prefill to this JSON file")
    replay: bool = option(
        "then record the same run's replies (untimed) and run it over them with no server: the floor the TEE's "
        "own work imposes, per token and per call (JSON: floor)",
        False,
    )
    clients: int = option(
        "N TEE client processes decoding at once on one server (with --decode M, default 16): aggregate and "
        "per-client decode tokens/s and per-token latency, against one client in the same run",
        0,
    )


@dataclass
class DiagnoseFlags:
    sizes: str = option("bulk transfer sizes in MB (default 8,32,128)", "8,32,128")
    rounds: int = option("small round trips to time (default 1000)", 1000)
    json_path: str | None = option("write the figures to this JSON file", flag="--json")


@dataclass
class PadsFlags:
    device: str = device_option()
    dtype: str = dtype_option()
    pads_dir: str | None = pads_dir_option()
    tokens: int = option("pads for this many tokens of every linear", parse=int, required=True)


@dataclass
class PresetFlags:
    name: str = option("", flag="name", choices=tuple(model_names()))


@dataclass
class KeysFlags:
    folder: str = option("DIR for server.key[_secret], client.key[_secret] and allowed/", flag="folder")


@dataclass
class VerifyFlags:
    url: str = option("the API's https:// URL", flag="url")
    collateral: str = option(
        f"Intel collateral: a dcap-qvl JSON file, or a PCCS/PCS URL to fetch it (default {INTEL_PCS_URL})",
        INTEL_PCS_URL,
    )
    expect_mrenclave: str | None = option("SGX: the enclave's MRENCLAVE (hex)")
    expect_mrsigner: str | None = option("SGX: the enclave signer's MRSIGNER (hex)")
    expect_mrtd: str | None = option("TDX: the TD's MRTD (hex)")
    expect_model: str | None = option("sha256 of the GGUF file, or the model's fingerprint")
    expect_settings: str | None = option("e.g. private=true,verify=true,pad_bits=20")
    allow_tcb: str = option("TCB statuses to accept, comma-separated (default UpToDate)", "UpToDate")
    pin_out: str | None = option("write the attested certificate (PEM) here, for other clients to pin")


@dataclass
class ApiOptions:
    """`tsqp api`'s flags (and the client options of every slot)."""

    run: RunOptions
    host: str = option("address to listen on (127.0.0.1)", env_var="TSQP_API_HOST")
    port: int = option("port (8000; 0: any)", env_var="TSQP_API_PORT")
    api_key: str | None = option("require `Authorization: Bearer KEY` on /v1 ($TSQP_API_KEY)", env_var="TSQP_API_KEY")
    name: str | None = option(
        "the model's id in /v1/models (default: preset, folder or file name)",
        flag="--served-model-name",
        metavar="SERVED_MODEL_NAME",
    )
    parallel: int = option("generations at once, each its own server session (default 4)", 4)
    slots: str = option(
        "where the --parallel generations run: batched (one forward pass a step for all), threads (one lock), "
        "processes (slow under Gramine); auto: batched, threads if private or --attention server|decode",
        "auto",
        choices=("auto", "batched", "threads", "processes"),
    )
    tls: bool = option(
        "serve HTTPS with a key made in the TEE at start (kept in memory); its certificate is written out to pin",
        False,
    )
    tls_cert: Path | None = option("serve HTTPS with this certificate (PEM) ...", parse=optional_path)
    tls_key: Path | None = option("... and this key (PEM)", parse=optional_path)
    tls_cert_out: Path | None = option(
        "where --tls writes its certificate (default: $TSQP_CACHE/api/)", parse=optional_path
    )
    insecure_http: bool = option(
        "allow plain HTTP on a non-loopback --host (the host then reads every prompt and answer)", False
    )
    attestation: str = option(
        "quote the --tls key, the model and the settings: sgx (Gramine's /dev/attestation), tdx (configfs-tsm), "
        "none; auto: what this process has, else none (clients then refuse it); sgx or tdx where absent fails",
        "auto",
        choices=("auto", "sgx", "tdx", "none"),
    )
