"""`tsqp` command line: flags with environment-variable defaults, parsed here and nowhere else.

tsqp serve    --model DIR [--device cpu|cuda:N] [--dtype ...] [--listen ENDPOINT]
tsqp logits   --model DIR --token-ids 1,2,3 --out FILE.npy [--connect ENDPOINT]
tsqp generate [--model DIR | --preset NAME] (--prompt TEXT [--chat] | --token-ids 1,2,3) [--max-new-tokens N]
              [--temperature T] [--top-k K] [--top-p P] [--seed S] [--connect ENDPOINT] [--json]
tsqp bench    [--model DIR | --preset NAME] [--tokens N] [--decode N] [--compare] [--json FILE]
tsqp api      --model M [--host H] [--port P] [--api-key KEY] [--tls] [--private]   (OpenAI-compatible HTTP API)
tsqp pads     --model DIR --tokens N [--dtype ...] [--pads-dir DIR]   (private mode's pads, ahead of time)
tsqp preset   NAME            (writes or fetches the preset checkpoint and prints its folder)

--model takes a Hugging Face folder, a GGUF file or a preset name everywhere (--preset NAME: the same).
tsqp keys     DIR             (CurveZMQ key pairs and allow-list for --curve-keys DIR)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tsqp import __version__
from tsqp.errors import TsqpError
from tsqp.model.sources import model_names
from tsqp.tee.runner import RunOptions
from tsqp.wire.protocol import FLOAT_DTYPES, MAX_MESSAGE_BYTES
from tsqp.wire.transport import endpoint_from_env


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsqp", description="Split LLaMA inference between a TEE and a GPU server.")
    parser.add_argument("--version", action="version", version=f"tsqp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default=env("LLAMA_MODEL_PATH"),
            help="a Hugging Face Llama folder, a GGUF file (converted once into the cache) or a preset name "
            f"({', '.join(model_names())}) (default: $LLAMA_MODEL_PATH)",
        )
        p.add_argument(
            "--preset",
            choices=model_names(),
            help="the same as --model NAME: a random-weight shape written on first use, or a real model fetched",
        )

    def server_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--device",
            default=env("LLAMA_GPU_DEVICE", "cpu"),
            help="where the server computes: cpu or cuda:N (default: $LLAMA_GPU_DEVICE or cpu)",
        )
        p.add_argument(
            "--dtype",
            default=env("LLAMA_DTYPE", "float32"),
            choices=FLOAT_DTYPES,
            help="server weights and wire dtype (default: $LLAMA_DTYPE or float32)",
        )

    def curve_flag(p: argparse.ArgumentParser, side: str) -> None:
        p.add_argument(
            "--curve-keys",
            default=env("TSQP_CURVE_KEYS"),
            metavar="DIR",
            help=f"authenticate and encrypt the link with CurveZMQ using the {side} keys in DIR, "
            "written by `tsqp keys DIR` (default: $TSQP_CURVE_KEYS)",
        )

    def client_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--connect",
            default=endpoint_from_env(),
            help="a running server (ipc://PATH or tcp://HOST:PORT; default: $LLAMA_GPU_ENDPOINT, $LLAMA_IPC_PATH, "
            "$LLAMA_GPU_PORT); without one a private server is started",
        )
        p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one reply (default 600)")
        p.add_argument(
            "--connect-timeout",
            type=float,
            default=10.0,
            metavar="SECONDS",
            help="seconds to wait for the server (--connect, --helper) to take the connection at all (default 10)",
        )
        p.add_argument(
            "--start-timeout",
            type=float,
            default=600.0,
            help="seconds to wait for a private server to load its weights (default 600)",
        )
        p.add_argument(
            "--transport",
            choices=("auto", "shm", "zmq"),
            default=env("TSQP_TRANSPORT", "auto"),
            help="bulk tensors through a /dev/shm arena (shm) or in ZeroMQ frames (zmq); "
            "auto: shm when the server is on this host",
        )
        p.add_argument(
            "--arena-name",
            default=env("TSQP_ARENA_NAME"),
            help="fixed arena file name in /dev/shm (tsqp-...), e.g. one listed in a Gramine manifest",
        )
        curve_flag(p, "client (client.key_secret, server.key)")
        p.add_argument(
            "--doorbell",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="lone small requests through the arena's doorbell, polled for 0.5 ms (default); "
            "--no-doorbell: always ZeroMQ",
        )
        p.add_argument(
            "--pipeline",
            choices=("auto", "on", "off"),
            default=env("TSQP_PIPELINE", "auto"),
            help="attention by query chunks, the TEE's softmax overlapping the server's next chunk; "
            "auto: on when the server computes on a GPU (a CPU server on this host shares the TEE's cores)",
        )
        p.add_argument(
            "--verify",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="check every server result with Freivalds' test (default); --no-verify to measure without",
        )
        p.add_argument(
            "--private",
            action="store_true",
            default=env("TSQP_PRIVATE") in ("1", "true", "yes"),
            help="private mode: embedding and attention in the TEE, every linear input masked with a fresh "
            "one-time pad; the server never sees the prompt, the activations or the logits (default: $TSQP_PRIVATE)",
        )
        p.add_argument(
            "--helper",
            default=env("TSQP_HELPER"),
            metavar="ENDPOINT",
            help="private mode: a second `tsqp serve`, run by another party, computes the pads from their seeds "
            "(the two servers must not collude); default: pads precomputed in the TEE (`tsqp pads`)",
        )
        p.add_argument(
            "--helper-curve-keys",
            default=env("TSQP_HELPER_CURVE_KEYS"),
            metavar="DIR",
            help="CurveZMQ keys for the helper link (client.key_secret and the helper's server.key); "
            "required for a tcp:// helper",
        )
        p.add_argument(
            "--pad-bits",
            type=int,
            default=20,
            help="private mode: pads 2^BITS times each linear's calibrated largest input (default 20; "
            "docs/threat-model.md has the error and leakage table)",
        )
        pads_flag(p)
        server_flags(p)

    def pads_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--pads-dir",
            default=env("TSQP_PADS_DIR"),
            metavar="DIR",
            help="private mode's pad pools and their key (default: $TSQP_PADS_DIR or $TSQP_CACHE/pads)",
        )

    serve = commands.add_parser("serve", help="run the untrusted GPU server")
    model_flags(serve)
    server_flags(serve)
    serve.add_argument(
        "--listen",
        default=None,
        help="ipc://PATH or tcp://HOST:PORT (default: $LLAMA_GPU_ENDPOINT, $LLAMA_IPC_PATH, "
        "$LLAMA_GPU_PORT, else a per-user ipc path)",
    )
    serve.add_argument("--max-cache-mb", type=int, default=8192, help="KV cache memory cap over all sessions")
    serve.add_argument(
        "--max-memory-mb",
        type=int,
        default=int(env("TSQP_MAX_MEMORY_MB", "0")),
        help="the server's memory budget: a request that would take it past this is refused, the server goes on "
        "(default: $TSQP_MAX_MEMORY_MB, else 80%% of the host's memory or of its cgroup's limit)",
    )
    serve.add_argument("--idle-timeout", type=float, default=600.0, help="seconds before an idle session is freed")
    serve.add_argument(
        "--batch-hold-ms",
        type=float,
        default=None,
        metavar="MS",
        help="how long a batchable request may wait for another client's same op, when that client is known to "
        "be on its way (a lone client never waits); 0: batch only what is queued (default $TSQP_BATCH_HOLD_MS or 10)",
    )
    serve.add_argument(
        "--private-only",
        action="store_true",
        help="hold only private mode's float64 weights and refuse plain-mode calls (half the memory of both); "
        "a private client's own server runs so",
    )
    serve.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="shard the weights over N ranks (GPUs cuda:K..K+N-1 or shares of the CPU cores) with torch.distributed; "
        "on one host the ranks are started here, across hosts by torchrun (README); default 1",
    )
    curve_flag(serve, "server (server.key_secret; clients admitted from allowed/)")

    logits = commands.add_parser("logits", help="write float32 logits [seq, vocab] for every position")
    model_flags(logits)
    client_flags(logits)
    logits.add_argument("--token-ids", required=True, help="comma-separated token ids, e.g. 1,2,3")
    logits.add_argument("--out", required=True, help="output .npy file")

    generate = commands.add_parser("generate", help="generate text: prefill, then decode with the server's KV cache")
    model_flags(generate)
    client_flags(generate)
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, tokenized with the checkpoint's tokenizer.json")
    prompt.add_argument("--token-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    generate.add_argument(
        "--chat", action="store_true", help="wrap --prompt as one user turn in the checkpoint's chat template"
    )
    generate.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens (default 128)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    generate.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the smallest set of tokens whose probability reaches p (1: off)",
    )
    generate.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text")
    generate.add_argument(
        "--json", action="store_true", help="print one JSON object (ids, text, timings) instead of streaming the text"
    )

    bench = commands.add_parser("bench", help="time a prefill and print the statistics table")
    model_flags(bench)
    client_flags(bench)
    bench.add_argument("--tokens", type=int, default=128, help="prompt length (default 128)")
    bench.add_argument(
        "--decode",
        type=int,
        default=0,
        help="then time this many greedy decode steps with the server's KV cache (default 0: none)",
    )
    bench.add_argument(
        "--compare",
        action="store_true",
        help="also time transformers' monolithic prefill (sdpa and eager), and generate with --decode, in the same run",
    )
    bench.add_argument("--json", dest="json_path", help="write the figures to this JSON file")
    bench.add_argument(
        "--sweep",
        help="more prompt lengths to time, e.g. 128,512,1024,2048 (with --compare: transformers too, each length)",
    )
    bench.add_argument("--trace", help="write a Chrome/Perfetto trace of the timed prefill to this JSON file")
    bench.add_argument(
        "--clients",
        type=int,
        default=0,
        help="N TEE client processes decoding at once on one server (with --decode M, default 16): aggregate "
        "and per-client decode tokens/s and per-token latency, against one client in the same run",
    )

    diagnose = commands.add_parser("diagnose", help="transport in use, round-trip latency and bandwidth")
    model_flags(diagnose)
    client_flags(diagnose)
    diagnose.add_argument("--sizes", default="8,32,128", help="bulk transfer sizes in MB (default 8,32,128)")
    diagnose.add_argument("--rounds", type=int, default=1000, help="small round trips to time (default 1000)")
    diagnose.add_argument("--json", dest="json_path", help="write the figures to this JSON file")

    api = commands.add_parser("api", help="serve the OpenAI-compatible HTTP API from the TEE process")
    model_flags(api)
    client_flags(api)
    api.add_argument("--host", default=env("TSQP_API_HOST", "127.0.0.1"), help="address to listen on (127.0.0.1)")
    api.add_argument("--port", type=int, default=int(env("TSQP_API_PORT", "8000")), help="port (8000; 0: any)")
    api.add_argument(
        "--api-key", default=env("TSQP_API_KEY"), help="require `Authorization: Bearer KEY` on /v1 ($TSQP_API_KEY)"
    )
    api.add_argument("--served-model-name", help="the model's id in /v1/models (default: preset, folder or file name)")
    api.add_argument(
        "--parallel", type=int, default=4, help="generations at once, each its own server session (default 4)"
    )
    api.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS with a key made in the TEE at start (kept in memory); its certificate is written out to pin",
    )
    api.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM) ...")
    api.add_argument("--tls-key", help="... and this key (PEM)")
    api.add_argument("--tls-cert-out", help="where --tls writes its certificate (default: $TSQP_CACHE/api/)")
    api.add_argument(
        "--insecure-http",
        action="store_true",
        help="allow plain HTTP on a non-loopback --host (the host then reads every prompt and answer)",
    )

    pads = commands.add_parser("pads", help="precompute private mode's one-time pads in the TEE, into a pool file")
    model_flags(pads)
    server_flags(pads)
    pads_flag(pads)
    pads.add_argument("--tokens", type=int, required=True, help="pads for this many tokens of every linear")

    preset = commands.add_parser("preset", help="write or fetch a preset checkpoint (if needed) and print its folder")
    preset.add_argument("name", choices=model_names())

    keys = commands.add_parser("keys", help="write CurveZMQ key pairs (server, client) and an allow-list")
    keys.add_argument("folder", help="DIR for server.key[_secret], client.key[_secret] and allowed/")
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
    return RunOptions(
        model_dir=model_dir,
        connect=args.connect,
        device=args.device,
        dtype=args.dtype,
        timeout_s=args.timeout,
        connect_timeout_s=args.connect_timeout,
        start_timeout_s=args.start_timeout,
        transport=args.transport,
        arena_name=args.arena_name,
        curve_keys=Path(args.curve_keys) if args.curve_keys else None,
        verify=args.verify,
        pipeline=args.pipeline,
        doorbell=args.doorbell,
        private=args.private or bool(args.helper),
        pads_dir=Path(args.pads_dir) if args.pads_dir else None,
        helper=args.helper,
        pad_bits=args.pad_bits,
        helper_curve_keys=Path(args.helper_curve_keys) if args.helper_curve_keys else None,
    )


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

    from tsqp.model.config import LlamaConfig
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
    session_capacity(LlamaConfig.from_model_dir(model_dir), len(prompt_ids), args.max_new_tokens)  # before the server
    stream = TextStream(tokenizer) if not args.json else None
    with open_model(run_options(args, model_dir)) as tee:
        eos = eos_token_ids(model_dir, tee.config)
        result = generate(tee, prompt_ids, args.max_new_tokens, sampling, eos, on_token=stream)
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
    stream.finish()
    print(
        f"[{len(result.generated_ids)} tokens, stopped by {result.stop_reason}; first token {result.ttft_s:.3f} s, "
        f"decode {result.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )


class TextStream:
    """Prints generated text as it comes: decodes every id so far and writes the new suffix.

    Decoding the whole sequence keeps multi-token characters and word spacing right; a suffix that
    ends inside a UTF-8 character (U+FFFD) waits for the next token. Without a tokenizer, ids are printed.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        if self.tokenizer is None:
            sys.stdout.write(("," if len(self.ids) > 1 else "") + str(token))
        else:
            text = self.tokenizer.decode(self.ids)
            if text.endswith("\ufffd"):
                return
            sys.stdout.write(text[len(self.printed) :])
            self.printed = text
        sys.stdout.flush()

    def finish(self) -> None:
        if self.tokenizer is not None:
            sys.stdout.write(self.tokenizer.decode(self.ids)[len(self.printed) :])
        sys.stdout.write("\n")
        sys.stdout.flush()


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


def cmd_api(args: argparse.Namespace) -> None:
    from tsqp.api.serve import ApiOptions, run_api
    from tsqp.model.sources import served_name

    spec = args.preset or args.model
    model_dir = resolve_model(args)
    run_api(
        ApiOptions(
            run=run_options(args, model_dir),
            name=args.served_model_name or served_name(spec),
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            parallel=args.parallel,
            tls=args.tls,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            tls_cert_out=Path(args.tls_cert_out) if args.tls_cert_out else None,
            insecure_http=args.insecure_http,
        )
    )


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
