"""`tsqp api`: the OpenAI-compatible API, served by uvicorn from the TEE process.

Without --connect it starts its own GPU server, as the other client commands do, and every slot
connects to that one server. The first slot opens before the API listens, so a wrong model, an
unreachable server or a refused key is reported at start, in one line.

With --tls the key is made here and, where the process can quote (--attestation, tsqp/attest), the
quote over the key, the model and the settings goes into the certificate and `GET /v1/attestation`.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
from contextlib import ExitStack
from pathlib import Path

from tsqp.api.app import ApiState, build_app
from tsqp.api.slots import ModelSlots, batched_options, slots_kind
from tsqp.api.tls import TlsFiles, ephemeral
from tsqp.attest.evidence import Evidence, make_claims, report_data
from tsqp.attest.sources import NoQuotes, QuoteSource, select
from tsqp.errors import TsqpError
from tsqp.model.config import ModelConfig
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
    if slots_kind(options) == "batched":
        batched_options(options.run)  # refused before a server starts
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


def quote_source(options: ApiOptions) -> QuoteSource:
    """--attestation's source; a quote binds only a key made in this process (--tls), never a key file."""
    if options.attestation in ("sgx", "tdx") and not options.tls:
        raise TsqpError(f"--attestation {options.attestation} needs --tls: a quote binds a key made in the TEE")
    return select(options.attestation) if options.tls else NoQuotes()


def tls_files(options: ApiOptions, port: int, claims: dict, source: QuoteSource) -> tuple[TlsFiles | None, Evidence]:
    """The TLS files, and the evidence over the key and the claims (no quote without a key made here)."""
    unattested = Evidence("none", None, b"", claims)
    if options.tls_cert is not None:
        return TlsFiles(str(options.tls_cert), str(options.tls_key), None, temporary_key=False), unattested
    if not options.tls:
        return None, unattested

    def evidence_for(key_sha256: bytes) -> Evidence:
        data = report_data(key_sha256, claims)
        return Evidence(source.tee, source.quote(data), key_sha256, claims)

    out = options.tls_cert_out or cache_dir().parent / "api" / f"cert-{options.host}-{port}.pem"
    return ephemeral(out, options.host, evidence_for)


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


def run_api(options: ApiOptions, gguf: Path | None = None, source: QuoteSource | None = None) -> None:
    """gguf: the file --model named, if it was one (its sha256 is part of the model's identity).
    source: the quote source (default: --attestation's); tests hand in their own."""
    import uvicorn

    check_options(options)
    source = source or quote_source(options)
    run = options.run
    tokenizer = TextTokenizer(run.model_dir)
    sock = bind(options.host, options.port)  # the port is known (and taken) before the model loads
    port = sock.getsockname()[1]
    with ExitStack() as stack:
        stack.callback(sock.close)
        server = stack.enter_context(start_server(run)) if not run.connect else None
        eos = eos_token_ids(run.model_dir, ModelConfig.from_model_dir(run.model_dir))
        slots = ModelSlots(run, eos, options.parallel, server=server, kind=slots_kind(options))
        stack.callback(slots.close)
        first = slots.start()
        state = ApiState(
            model=options.name,
            tokenizer=tokenizer,
            context=first.config.max_position_embeddings,
            vocab_size=first.config.vocab_size,
            slots=slots,
            api_key=options.api_key,
        )
        stack.callback(state.executor.shutdown, wait=False, cancel_futures=True)
        claims = make_claims(first.fingerprint, gguf, run.private, run.verify, run.pad_bits)
        tls, evidence = tls_files(options, port, claims, source)
        state.attestation = evidence.document()
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
        attested = f"attested: {evidence.tee}" if evidence.quote is not None else "not attested"
        print(
            f"tsqp api: {scheme}://{shown}:{port}/v1 serves {options.name} ({mode} mode, {options.parallel} slots, "
            f"{attested})",
            file=sys.stderr,
            flush=True,
        )
        if tls is not None and options.tls_cert is None:
            print(f"tsqp api: certificate for clients to pin: {tls.certfile}", file=sys.stderr, flush=True)
        # uvicorn shuts down gracefully on SIGTERM and then raises it again: exit through the stack
        # (slots closed, arenas unlinked, the server stopped) rather than die by the default action.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        uvicorn.Server(config).run(sockets=[sock])


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)
