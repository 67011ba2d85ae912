"""`tsqp` command line: each subcommand's flags are the fields of its option groups (tsqp/options.py),
with environment-variable defaults (tsqp/env.py) read when the parser is built.

tsqp serve    --model DIR [--device cpu|cuda:N] [--dtype ...] [--listen ENDPOINT]
tsqp logits   --model DIR --token-ids 1,2,3 --out FILE.npy [--connect ENDPOINT]
tsqp generate [--model DIR | --preset NAME] (--prompt TEXT [--chat] | --token-ids 1,2,3) [--max-new-tokens N]
              [--temperature T] [--top-k K] [--top-p P] [--seed S] [--connect ENDPOINT] [--json]
tsqp bench    [--model DIR | --preset NAME] [--tokens N] [--decode N] [--compare] [--replay] [--json FILE]
tsqp diagnose [--model DIR | --preset NAME] [--sizes 8,32,128] [--rounds N]   (transport, latency, bandwidth)
tsqp api      --model M [--host H] [--port P] [--api-key KEY] [--tls] [--private]   (OpenAI-compatible HTTP API)
tsqp pads     --model DIR --tokens N [--dtype ...] [--pads-dir DIR]   (private mode's pads, ahead of time)
tsqp preset   NAME            (writes or fetches the preset checkpoint and prints its folder)
tsqp keys     DIR             (CurveZMQ key pairs and allow-list for --curve-keys DIR)
tsqp verify   URL [--collateral FILE|URL] (--expect-mrenclave HEX | --expect-mrtd HEX) [--expect-model SHA256]
              [--expect-settings K=V,...] [--allow-tcb STATUS,...] [--pin-out FILE]   (checks an API's attestation)

--model takes a Hugging Face folder, a GGUF file or a preset name everywhere (--preset NAME: the same).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tsqp import __version__
from tsqp.api.text import TextPieces
from tsqp.errors import TsqpError
from tsqp.options import (
    ApiOptions,
    BenchFlags,
    DiagnoseFlags,
    GenerateFlags,
    KeysFlags,
    LogitsFlags,
    ModelFlags,
    PadsFlags,
    PresetFlags,
    RunOptions,
    ServeFlags,
    VerifyFlags,
    add_options,
    from_args,
)
from tsqp.wire.protocol import MAX_MESSAGE_BYTES

SUBCOMMANDS = (  # name, help, the option groups whose fields are its flags
    ("serve", "run the untrusted GPU server", (ModelFlags, ServeFlags)),
    ("logits", "write float32 logits [seq, vocab] for every position", (ModelFlags, RunOptions, LogitsFlags)),
    (
        "generate",
        "generate text: prefill, then decode with the server's KV cache",
        (ModelFlags, RunOptions, GenerateFlags),
    ),
    ("bench", "time a prefill and print the statistics table", (ModelFlags, RunOptions, BenchFlags)),
    ("diagnose", "transport in use, round-trip latency and bandwidth", (ModelFlags, RunOptions, DiagnoseFlags)),
    ("api", "serve the OpenAI-compatible HTTP API from the TEE process", (ModelFlags, RunOptions, ApiOptions)),
    ("pads", "precompute private mode's one-time pads in the TEE, into a pool file", (ModelFlags, PadsFlags)),
    ("preset", "write or fetch a preset checkpoint (if needed) and print its folder", (PresetFlags,)),
    ("keys", "write CurveZMQ key pairs (server, client) and an allow-list", (KeysFlags,)),
    ("verify", "check an API server's attestation (quote, measurement, TLS key, model); one line", (VerifyFlags,)),
)


def build_parser() -> argparse.ArgumentParser:
    """The `tsqp` parser: each subcommand's flags come from its option groups (tsqp/options.py), their
    defaults from the environment as it is now."""
    parser = argparse.ArgumentParser(prog="tsqp", description="Split LLaMA inference between a TEE and a GPU server.")
    parser.add_argument("--version", action="version", version=f"tsqp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text, groups in SUBCOMMANDS:
        command = commands.add_parser(name, help=help_text)
        for group in groups:
            add_options(command, group)
    return parser


def resolve_model(args: argparse.Namespace, default_preset: str | None = None) -> Path:
    """The folder --model (or its alias --preset) names, or the default preset's."""
    from tsqp.model.sources import resolve_model as resolve

    spec = getattr(args, "preset", None) or args.model or default_preset
    if spec is None:
        raise TsqpError("no model given: pass --model (a folder, a GGUF file or a preset) or set LLAMA_MODEL_PATH")
    return resolve(spec)


def run_options(args: argparse.Namespace, model_dir: Path) -> RunOptions:
    """Every client command's options; --helper implies --private."""
    options = from_args(RunOptions, args, model_dir=model_dir)
    return replace(options, private=options.private or bool(options.helper))


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise TsqpError(f"{flag} must be comma-separated integers, got {text!r}") from None


def parse_token_ids(text: str) -> list[int]:
    ids = parse_int_list(text, "--token-ids")
    if not ids:
        raise TsqpError("--token-ids is empty")
    return ids


def cmd_serve(args: argparse.Namespace) -> None:
    from tsqp.server.startup import run_server
    from tsqp.wire.curve import server_keys
    from tsqp.wire.transport import default_endpoint

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise TsqpError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.tensor_parallel < 1:
        raise TsqpError("--tensor-parallel must be at least 1")
    if args.max_memory_mb < 0:
        raise TsqpError("--max-memory-mb must be positive (0: the default)")
    curve = server_keys(args.curve_keys) if args.curve_keys else None  # checked before the weights load
    run_server(
        str(resolve_model(args)),
        args.listen or default_endpoint(),
        args.device,
        args.dtype,
        curve=curve,
        tensor_parallel=args.tensor_parallel,
        hold_s=None if args.batch_hold_ms is None else args.batch_hold_ms / 1000,
        max_cache_bytes=args.max_cache_mb << 20,
        max_memory_bytes=args.max_memory_mb << 20 or None,
        idle_timeout_s=args.idle_timeout,
        private_only=args.private_only,
    )


def cmd_logits(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from tsqp.tee.generate import kv_session
    from tsqp.tee.runner import open_model

    ids = torch.tensor(parse_token_ids(args.token_ids), dtype=torch.int64)
    with open_model(run_options(args, resolve_model(args))) as tee:
        tee.check_ids(ids)
        with kv_session(tee, ids.shape[0]):
            logits = tee.forward(ids)
    np.save(args.out, logits.numpy())
    print(f"wrote {args.out}: float32 {list(logits.shape)}")


def cmd_bench(args: argparse.Namespace) -> None:
    from tsqp.measure.bench import run_bench

    if args.tokens < 1:
        raise TsqpError("--tokens must be at least 1")
    if args.decode < 0:
        raise TsqpError("--decode must be at least 0")
    if args.clients:
        return bench_clients(args)
    sweep = parse_int_list(args.sweep, "--sweep") if args.sweep else []
    if min([args.tokens, *sweep]) < 1:
        raise TsqpError("--tokens and --sweep lengths must be at least 1")
    run_bench(
        run_options(args, resolve_model(args, default_preset="tiny")),
        args.tokens,
        compare=args.compare,
        json_path=args.json_path,
        decode=args.decode,
        sweep=sweep,
        trace_path=args.trace,
        replay=args.replay,
    )


def bench_clients(args: argparse.Namespace) -> None:
    import json

    from tsqp.measure.load import run_load

    if args.clients < 1:
        raise TsqpError("--clients must be at least 1")
    options = run_options(args, resolve_model(args, default_preset="tiny"))
    result = run_load(options, args.clients, args.tokens, args.decode or 16)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))


def cmd_generate(args: argparse.Namespace) -> None:
    import json

    from tsqp.model.config import ModelConfig
    from tsqp.tee.generate import generate, session_capacity
    from tsqp.tee.runner import open_model
    from tsqp.tee.sampling import SamplingOptions
    from tsqp.tee.tokenizer import TOKENIZER_FILE, TextTokenizer, eos_token_ids

    model_dir = resolve_model(args)
    sampling = SamplingOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.prompt is not None:  # the tokenizer is required, and checked before a server starts
        tokenizer = TextTokenizer(model_dir)
        prompt_ids = tokenizer.chat_prompt_ids(args.prompt) if args.chat else tokenizer.encode(args.prompt)
    else:
        if args.chat:
            raise TsqpError("--chat needs --prompt: the chat template applies to text")
        tokenizer = TextTokenizer(model_dir) if (model_dir / TOKENIZER_FILE).is_file() else None
        prompt_ids = parse_token_ids(args.token_ids)
    session_capacity(ModelConfig.from_model_dir(model_dir), len(prompt_ids), args.max_new_tokens)  # before the server
    on_token, finish = text_stream(tokenizer) if not args.json else (None, None)
    with open_model(run_options(args, model_dir)) as tee:
        eos = eos_token_ids(model_dir, tee.config)
        result = generate(tee, prompt_ids, args.max_new_tokens, sampling, eos, on_token=on_token)
    text = tokenizer.decode(result.generated_ids) if tokenizer else None
    if args.json:
        print(
            json.dumps(
                {
                    "prompt_ids": result.prompt_ids,
                    "generated_ids": result.generated_ids,
                    "text": text,
                    "stop_reason": result.stop_reason,
                    "ttft_s": result.ttft_s,
                    "decode_tokens_per_s": result.decode_tokens_per_s,
                }
            )
        )
        return
    finish()
    print(
        f"[{len(result.generated_ids)} tokens, stopped by {result.stop_reason}; first token {result.ttft_s:.3f} s, "
        f"decode {result.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )


def text_stream(tokenizer) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(on_token, finish) for `generate`: prints the text as it comes, whole characters only
    (api.text.TextPieces), or the ids, comma-separated, without a tokenizer."""
    pieces = TextPieces(tokenizer, stop=[]) if tokenizer is not None else None
    printed: list[int] = []

    def on_token(token: int) -> None:
        sys.stdout.write(pieces.push(token) if pieces else ("," if printed else "") + str(token))
        sys.stdout.flush()
        printed.append(token)

    def finish() -> None:
        sys.stdout.write((pieces.finish() if pieces else "") + "\n")
        sys.stdout.flush()

    return on_token, finish


def cmd_diagnose(args: argparse.Namespace) -> None:
    import json

    from tsqp.measure.diagnose import run_diagnose

    sizes = parse_int_list(args.sizes, "--sizes")
    if args.rounds < 1 or not sizes or min(sizes) < 1:
        raise TsqpError("--rounds and every --sizes entry must be at least 1")
    if max(sizes) >= MAX_MESSAGE_BYTES >> 20:  # an echo carries the payload in one message
        raise TsqpError(f"every --sizes entry must be below {MAX_MESSAGE_BYTES >> 20} MB, the largest message")
    result = run_diagnose(run_options(args, resolve_model(args, default_preset="tiny")), sizes, args.rounds)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))


def cmd_api(args: argparse.Namespace, source=None) -> None:
    """source: the quote source, None for --attestation's (tests hand in their own, never the CLI)."""
    from tsqp.api.serve import run_api
    from tsqp.model.sources import served_name

    options = from_args(ApiOptions, args, run=run_options(args, resolve_model(args)))
    spec = args.preset or args.model
    run_api(replace(options, name=options.name or served_name(spec)), gguf=model_file(spec), source=source)


def model_file(spec: str | None) -> Path | None:
    """The GGUF file behind --model (a path, or a real model fetched as one): its sha256 is part of the
    model's identity in the API's attestation."""
    from tsqp.model.fetch import REAL_MODELS, fetched_gguf

    if spec in REAL_MODELS:
        return fetched_gguf(spec)
    path = Path(spec).expanduser() if spec else None
    return path if path is not None and path.is_file() else None


def cmd_verify(args: argparse.Namespace, root_ca_der: bytes | None = None) -> None:
    """root_ca_der: a root of trust other than Intel's, for tests only (no flag sets it)."""
    from tsqp.attest.client import attest
    from tsqp.attest.verify import Expectation, Refused, parse_settings

    expect = Expectation(
        mrenclave=args.expect_mrenclave,
        mrsigner=args.expect_mrsigner,
        mrtd=args.expect_mrtd,
        model=args.expect_model,
        settings=parse_settings(args.expect_settings),
        allow_tcb=tuple(s for s in args.allow_tcb.replace(" ", "").split(",") if s),
    )
    try:
        attested = attest(args.url, expect, args.collateral, root_ca_der=root_ca_der)
    except Refused as exc:
        raise TsqpError(f"refused: {exc}") from None
    if args.pin_out:
        Path(args.pin_out).write_text(attested.cert_pem)
    print(attested.verified.line())


def cmd_pads(args: argparse.Namespace) -> None:
    from tsqp.model.checkpoint import Checkpoint
    from tsqp.model.presets import cache_dir
    from tsqp.tee.pad_pool import fill
    from tsqp.wire.protocol import DTYPES

    if args.tokens < 1:
        raise TsqpError("--tokens must be at least 1")
    checkpoint = Checkpoint(resolve_model(args))
    folder = Path(args.pads_dir) if args.pads_dir else cache_dir() / "pads"
    path, seconds = fill(checkpoint, checkpoint.fingerprint(), DTYPES[args.dtype], args.tokens, folder)
    size = path.stat().st_size
    print(path)
    print(
        f"pads for {args.tokens} tokens ({args.dtype} server) in {seconds:.2f} s, {size / 1e6:.1f} MB "
        f"({size / args.tokens / 1e6:.2f} MB a token)",
        file=sys.stderr,
    )


def cmd_preset(args: argparse.Namespace) -> None:
    from tsqp.model.sources import resolve_model as resolve

    print(resolve(args.name))


def cmd_keys(args: argparse.Namespace) -> None:
    from tsqp.wire.curve import generate

    for path in generate(args.folder):
        print(path)
    print(
        f"server host: tsqp serve --curve-keys {args.folder} (needs server.key_secret, allowed/); "
        f"client host: --curve-keys {args.folder} (needs client.key_secret, server.key)",
        file=sys.stderr,
    )


COMMANDS = {
    "api": cmd_api,
    "diagnose": cmd_diagnose,
    "serve": cmd_serve,
    "logits": cmd_logits,
    "generate": cmd_generate,
    "bench": cmd_bench,
    "pads": cmd_pads,
    "preset": cmd_preset,
    "keys": cmd_keys,
    "verify": cmd_verify,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except TsqpError as exc:
        print(f"tsqp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tsqp: interrupted", file=sys.stderr)
        return 130
    return 0
