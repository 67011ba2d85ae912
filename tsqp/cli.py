"""`tsqp` command line: flags with environment-variable defaults, parsed here and nowhere else.

    tsqp serve    --model DIR [--device cpu|cuda:N] [--dtype ...] [--listen ENDPOINT]
    tsqp logits   --model DIR --token-ids 1,2,3 --out FILE.npy [--connect ENDPOINT]
    tsqp bench    [--model DIR | --preset NAME] [--tokens N] [--compare] [--json FILE]
    tsqp preset   NAME            (writes the preset checkpoint and prints its folder)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tsqp import __version__
from tsqp.errors import TsqpError
from tsqp.presets import PRESETS, preset_path
from tsqp.protocol import FLOAT_DTYPES
from tsqp.runner import RunOptions


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsqp", description="Split LLaMA inference between a TEE and a GPU server.")
    parser.add_argument("--version", action="version", version=f"tsqp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def model_flags(p: argparse.ArgumentParser, presets: bool = False) -> None:
        p.add_argument("--model", default=env("LLAMA_MODEL_PATH"),
                       help="Hugging Face Llama checkpoint folder (default: $LLAMA_MODEL_PATH)")
        if presets:
            p.add_argument("--preset", choices=sorted(PRESETS),
                           help="a random-weight checkpoint of a named shape, written to the cache on first use")

    def server_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default=env("LLAMA_GPU_DEVICE", "cpu"),
                       help="where the server computes: cpu or cuda:N (default: $LLAMA_GPU_DEVICE or cpu)")
        p.add_argument("--dtype", default=env("LLAMA_DTYPE", "float32"), choices=FLOAT_DTYPES,
                       help="server weights and wire dtype (default: $LLAMA_DTYPE or float32)")

    def client_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--connect", default=env("LLAMA_GPU_ENDPOINT"),
                       help="a running server (ipc://PATH or tcp://HOST:PORT); without it a private server is started")
        p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one reply (default 600)")
        p.add_argument("--start-timeout", type=float, default=600.0,
                       help="seconds to wait for a private server to load its weights (default 600)")
        server_flags(p)

    serve = commands.add_parser("serve", help="run the untrusted GPU server")
    model_flags(serve)
    server_flags(serve)
    serve.add_argument("--listen", default=None,
                       help="ipc://PATH or tcp://HOST:PORT (default: $LLAMA_GPU_ENDPOINT, $LLAMA_IPC_PATH, "
                            "$LLAMA_GPU_PORT, else a per-user ipc path)")
    serve.add_argument("--max-cache-mb", type=int, default=8192, help="KV cache memory cap over all sessions")
    serve.add_argument("--idle-timeout", type=float, default=600.0, help="seconds before an idle session is freed")

    logits = commands.add_parser("logits", help="write float32 logits [seq, vocab] for every position")
    model_flags(logits)
    client_flags(logits)
    logits.add_argument("--token-ids", required=True, help="comma-separated token ids, e.g. 1,2,3")
    logits.add_argument("--out", required=True, help="output .npy file")

    bench = commands.add_parser("bench", help="time a prefill and print the statistics table")
    model_flags(bench, presets=True)
    client_flags(bench)
    bench.add_argument("--tokens", type=int, default=128, help="prompt length (default 128)")
    bench.add_argument("--compare", action="store_true",
                       help="also time transformers' monolithic prefill (sdpa and eager) in the same run")
    bench.add_argument("--json", dest="json_path", help="write the figures to this JSON file")

    preset = commands.add_parser("preset", help="write a preset checkpoint (if needed) and print its folder")
    preset.add_argument("name", choices=sorted(PRESETS))
    return parser


def resolve_model(args: argparse.Namespace, default_preset: str | None = None) -> Path:
    if getattr(args, "preset", None):
        return preset_path(args.preset)
    if args.model:
        return Path(args.model)
    if default_preset:
        return preset_path(default_preset)
    raise TsqpError("no model given: pass --model DIR or set LLAMA_MODEL_PATH")


def run_options(args: argparse.Namespace, model_dir: Path) -> RunOptions:
    return RunOptions(model_dir=model_dir, connect=args.connect, device=args.device, dtype=args.dtype,
                      timeout_s=args.timeout, start_timeout_s=args.start_timeout)


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise TsqpError(f"--token-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise TsqpError("--token-ids is empty")
    return ids


def cmd_serve(args: argparse.Namespace) -> None:
    from tsqp.server import run_server
    from tsqp.transport import default_endpoint

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise TsqpError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    run_server(str(resolve_model(args)), args.listen or default_endpoint(), args.device, args.dtype,
               max_cache_bytes=args.max_cache_mb << 20, idle_timeout_s=args.idle_timeout)


def cmd_logits(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from tsqp.runner import open_model

    ids = torch.tensor(parse_token_ids(args.token_ids), dtype=torch.int64)
    with open_model(run_options(args, resolve_model(args))) as tee:
        tee.check_ids(ids)
        tee.ops.open_session(ids.shape[0])
        logits = tee.forward(ids)
        tee.ops.close_session()
    np.save(args.out, logits.numpy())
    print(f"wrote {args.out}: float32 {list(logits.shape)}")


def cmd_bench(args: argparse.Namespace) -> None:
    from tsqp.bench import run_bench

    if args.tokens < 1:
        raise TsqpError("--tokens must be at least 1")
    run_bench(run_options(args, resolve_model(args, default_preset="tiny")), args.tokens,
              compare=args.compare, json_path=args.json_path)


def cmd_preset(args: argparse.Namespace) -> None:
    print(preset_path(args.name))


COMMANDS = {"serve": cmd_serve, "logits": cmd_logits, "bench": cmd_bench, "preset": cmd_preset}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except TsqpError as exc:
        print(f"tsqp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tsqp: interrupted", file=sys.stderr)
        return 130
    return 0
