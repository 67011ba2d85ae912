"""Every environment variable tsqp reads: name, type, default and meaning, in one table.

Values are read when asked for (at start: a command's flags, a client's or server's construction),
never at import, so a test or a launcher can set one before it starts a part. An unset or empty
variable gives its default. The README's table is this one (`markdown_table`; a test compares them),
so the two cannot drift. The one exception to "read at start" is OMP_WAIT_POLICY in tsqp/__init__.py,
which must be set before torch is first imported; it keeps the user's own value in
TSQP_USER_OMP_WAIT_POLICY.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tsqp.errors import TsqpError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Variable:
    name: str
    kind: type  # str, int, float, bool or Path: what `read` parses the text into
    default: object  # when unset or empty (None: no value)
    meaning: str  # one line, for the README


VARIABLES = (
    Variable("LLAMA_MODEL_PATH", str, None, "default for `--model`"),
    Variable("LLAMA_GPU_DEVICE", str, "cpu", "default for `--device`"),
    Variable("LLAMA_DTYPE", str, "float32", "default for `--dtype`"),
    Variable("LLAMA_GPU_ENDPOINT", str, None, "default for `--connect` and `serve --listen`"),
    Variable("LLAMA_IPC_PATH", str, None, "the ipc socket path of `serve --listen` and `--connect` (if unset above)"),
    Variable("LLAMA_GPU_PORT", int, None, "`tcp://127.0.0.1:PORT` for `serve --listen`, `--connect` (if unset above)"),
    Variable("TSQP_TRANSPORT", str, "auto", "default for `--transport` (`auto`, `shm`, `zmq`)"),
    Variable("TSQP_ARENA_NAME", str, None, "default for `--arena-name`"),
    Variable("TSQP_PIPELINE", str, "auto", "default for `--pipeline` (`auto`, `on`, `off`)"),
    Variable("TSQP_CURVE_KEYS", str, None, "default for `--curve-keys`"),
    Variable("TSQP_PRIVATE", bool, False, "default for `--private` (`1`)"),
    Variable("TSQP_PADS_DIR", str, None, "default for `--pads-dir` (else `$TSQP_CACHE/pads`)"),
    Variable("TSQP_HELPER", str, None, "default for `--helper`"),
    Variable("TSQP_HELPER_CURVE_KEYS", str, None, "default for `--helper-curve-keys`"),
    Variable("TSQP_API_HOST", str, "127.0.0.1", "default for `api --host`"),
    Variable("TSQP_API_PORT", int, 8000, "default for `api --port`"),
    Variable("TSQP_API_KEY", str, None, "default for `api --api-key`"),
    Variable("TSQP_MAX_MEMORY_MB", int, 0, "default for `serve --max-memory-mb` (0: 80% of the host's or cgroup's)"),
    Variable("TSQP_BATCH_HOLD_MS", float, 10.0, "default for `serve --batch-hold-ms`"),
    Variable(
        "TSQP_CACHE", Path, "~/.cache/tsqp", "where presets, fetched models, GGUF conversions, kernel plans are kept"
    ),
    Variable(
        "TSQP_CPU_LINEAR",
        str,
        "auto",
        "a CPU server's linear kernels: `auto` (measured per host), `unpacked`, `onednn`, `mkl` (server/kernels.py)",
    ),
    Variable(
        "TSQP_DOORBELL_SPIN_MS",
        float,
        None,
        "milliseconds a client polls the doorbell for its reply before it sleeps (unset: 20 where the server computes "
        "on other cores or a GPU, else 0)",
    ),
    Variable(
        "TSQP_DOORBELL_NAP", bool, True, "`0`: no nap until a doorbell reply is nearly due (tsqp/wire/doorbell.py)"
    ),
    Variable(
        "TSQP_DOORBELL_FUTEX", bool, True, "`0`: a client never sleeps on the doorbell's futex (inside an enclave)"
    ),
    Variable("TSQP_QUIET_SERVER", bool, False, "`1`: a client does not relay its own server's log lines"),
    Variable("TSQP_USER_OMP_WAIT_POLICY", str, None, "set by tsqp: the user's OMP_WAIT_POLICY before tsqp set it"),
)
BY_NAME = {variable.name: variable for variable in VARIABLES}


def read(name: str):
    """The variable's value now, parsed to its kind; its default when unset or empty."""
    variable = BY_NAME[name]
    text = os.environ.get(name) or ""
    if not text:
        return Path(variable.default).expanduser() if variable.kind is Path and variable.default else variable.default
    if variable.kind is bool:
        if text.lower() in TRUE_WORDS + FALSE_WORDS:
            return text.lower() in TRUE_WORDS
        raise TsqpError(f"{name}={text!r} is neither {'/'.join(TRUE_WORDS)} nor {'/'.join(FALSE_WORDS)}")
    try:
        value = variable.kind(text)
    except ValueError:
        raise TsqpError(f"{name}={text!r} is not a {variable.kind.__name__}: unset it or give one") from None
    return value.expanduser() if isinstance(value, Path) else value


def markdown_table() -> str:
    """The README's table of environment variables."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for variable in VARIABLES:
        default = variable.default
        if variable.kind is bool:
            default = int(default)
        lines.append(f"| `{variable.name}` | {'' if default is None else f'`{default}`'} | {variable.meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
