"""`tsqp api`: the OpenAI-compatible API, served by uvicorn from the TEE process.

Without --connect it starts its own GPU server, as the other client commands do, and every slot
connects to that one server. The first slot opens before the API listens, so a wrong model, an
unreachable server or a refused key is reported at start, in one line.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from contextlib import ExitStack

from tsqp.api.app import ApiState, build_app
from tsqp.api.slots import ModelSlots
from tsqp.api.tls import TlsFiles, ephemeral
from tsqp.errors import TsqpError
from tsqp.model.config import LlamaConfig
from tsqp.model.presets import cache_dir
from tsqp.options import ApiOptions
from tsqp.tee.runner import start_server
from tsqp.tee.tokenizer import TextTokenizer, eos_token_ids


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(options: ApiOptions) -> None:
    if options.parallel < 1:
        raise TsqpError("--parallel must be at least 1")
    if (options.tls_cert is None) != (options.tls_key is None):
        raise TsqpError("--tls-cert and --tls-key go together")
    tls = options.tls or options.tls_cert is not None
    if not tls and not is_loopback(options.host) and not options.insecure_http:
        raise TsqpError(
            f"--host {options.host} without --tls would send every prompt and answer in the clear through the "
            "host's network stack: add --tls (a key made in the TEE) or --tls-cert/--tls-key, "
            "or --insecure-http if you mean it"
        )
    for path in (options.tls_cert, options.tls_key):
        if path is not None and not path.is_file():
            raise TsqpError(f"{path} does not exist")


def tls_files(options: ApiOptions, port: int) -> TlsFiles | None:
    if options.tls_cert is not None:
        return TlsFiles(str(options.tls_cert), str(options.tls_key), None, temporary_key=False)
    if not options.tls:
        return None
    out = options.tls_cert_out or cache_dir().parent / "api" / f"cert-{options.host}-{port}.pem"
    return ephemeral(out, options.host)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TsqpError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_api(options: ApiOptions) -> None:
    import uvicorn

    check_options(options)
    run = options.run
    tokenizer = TextTokenizer(run.model_dir)
    sock = bind(options.host, options.port)  # the port is known (and taken) before the model loads
    port = sock.getsockname()[1]
    with ExitStack() as stack:
        stack.callback(sock.close)
        server = stack.enter_context(start_server(run)) if not run.connect else None
        eos = eos_token_ids(run.model_dir, LlamaConfig.from_model_dir(run.model_dir))
        slots = ModelSlots(run, eos, options.parallel, server=server, kind=options.slots)
        config = slots.start()
        stack.callback(slots.close)
        state = ApiState(
            model=options.name,
            tokenizer=tokenizer,
            context=config.max_position_embeddings,
            vocab_size=config.vocab_size,
            slots=slots,
            api_key=options.api_key,
        )
        stack.callback(state.executor.shutdown, wait=False, cancel_futures=True)
        tls = tls_files(options, port)
        if tls is not None:
            stack.callback(tls.loaded)
        config = uvicorn.Config(
            build_app(state),
            log_level="warning",
            timeout_graceful_shutdown=2,
            ssl_certfile=tls.certfile if tls else None,
            ssl_keyfile=tls.keyfile if tls else None,
            ssl_keyfile_password=tls.password if tls else None,
        )
        try:
            config.load()
        except Exception as exc:  # ssl errors of an operator's own files
            raise TsqpError(f"cannot load the TLS certificate and key ({exc})") from None
        if tls is not None:
            tls.loaded()
        scheme = "https" if tls else "http"
        shown = f"[{options.host}]" if ":" in options.host else options.host
        mode = "private" if run.private else "plain split"
        print(
            f"tsqp api: {scheme}://{shown}:{port}/v1 serves {options.name} ({mode} mode, {options.parallel} slots)",
            file=sys.stderr,
            flush=True,
        )
        if tls is not None and options.tls_cert is None:
            print(f"tsqp api: certificate for clients to pin: {tls.certfile}", file=sys.stderr, flush=True)
        uvicorn.Server(config).run(sockets=[sock])
