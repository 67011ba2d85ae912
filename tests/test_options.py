"""The command line's flags are the option groups' fields (tsqp/options.py): they cannot drift apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsqp import cli
from tsqp.options import ApiOptions, RunOptions, flag_fields, from_args

CLIENT_COMMANDS = ("logits", "generate", "bench", "diagnose", "api")
REQUIRED = {"logits": ["--token-ids", "1", "--out", "x.npy"], "generate": ["--token-ids", "1"]}


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("LLAMA_GPU_ENDPOINT", "LLAMA_IPC_PATH", "LLAMA_GPU_PORT", "LLAMA_GPU_DEVICE", "LLAMA_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("TRANSPORT", "ARENA_NAME", "PIPELINE", "CURVE_KEYS", "PRIVATE", "PADS_DIR", "HELPER"):
        monkeypatch.delenv(f"TSQP_{name}", raising=False)
    monkeypatch.delenv("TSQP_HELPER_CURVE_KEYS", raising=False)


@pytest.mark.parametrize("command", CLIENT_COMMANDS)
def test_every_client_command_takes_every_run_option_with_its_default(clean_env, command):
    args = cli.build_parser().parse_args([command, *REQUIRED.get(command, [])])
    assert cli.run_options(args, Path("m")) == RunOptions(model_dir=Path("m"))


def test_a_flag_reaches_its_field_and_helper_implies_private(clean_env):
    argv = ["generate", "--token-ids", "1", "--timeout", "5", "--no-verify", "--helper", "tcp://h:1"]
    options = cli.run_options(cli.build_parser().parse_args([*argv, "--pads-dir", "/p"]), Path("m"))
    assert (options.timeout_s, options.verify, options.helper) == (5.0, False, "tcp://h:1")
    assert options.private is True and options.pads_dir == Path("/p")


def test_an_environment_default_is_read_when_the_parser_is_built(clean_env, monkeypatch):
    monkeypatch.setenv("TSQP_TRANSPORT", "zmq")
    monkeypatch.setenv("TSQP_PRIVATE", "1")
    monkeypatch.setenv("LLAMA_GPU_PORT", "5555")
    options = cli.run_options(cli.build_parser().parse_args(["bench"]), Path("m"))
    assert (options.transport, options.private, options.connect) == ("zmq", True, "tcp://127.0.0.1:5555")


def test_api_options_come_from_their_flags(clean_env, monkeypatch):
    monkeypatch.setenv("TSQP_API_PORT", "81")
    args = cli.build_parser().parse_args(["api", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--parallel", "2"])
    fields = {f.name for f in flag_fields(ApiOptions)}
    assert fields <= set(vars(args)), "every ApiOptions flag is a flag of `tsqp api`"
    options = from_args(ApiOptions, args, run=RunOptions(model_dir=Path("m")))
    assert (options.port, options.parallel, options.tls_cert) == (81, 2, Path("c.pem"))
