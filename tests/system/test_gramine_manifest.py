"""The Gramine packaging of the TEE client: gramine/tsqp-tee.manifest.template and gramine/Makefile.

Gramine is not installable here, so the template is rendered the way gramine-manifest renders it
(Jinja2 with StrictUndefined and its `gramine`, `python`, `env`, `ldd` globals, stubbed) and the
result is parsed as TOML and checked against what docs/sgx.md promises.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jinja2
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

GRAMINE_DIR = pathlib.Path(__file__).resolve().parents[2] / "gramine"
TEMPLATE = GRAMINE_DIR / "tsqp-tee.manifest.template"
MAKEFILE = GRAMINE_DIR / "Makefile"

RUNTIME_DIR = "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc"
# The pool key's file name, from the client's source (importing it would import torch).
POOL_SOURCE = pathlib.Path(__file__).resolve().parents[2] / "tsqp" / "tee" / "pad_pool.py"
KEY_FILE = re.search(r'^KEY_FILE = "([^"]+)"', POOL_SOURCE.read_text(), re.MULTILINE).group(1)

# What gramine-manifest would get from gramine/Makefile for a venv install (all strings, as -D gives).
SAMPLE = {
    "log_level": "error",
    "arch_libdir": "/lib/x86_64-linux-gnu",
    "entrypoint": "/usr/bin/python3.11",
    "python_prefix": "/usr",
    "python_stdlib": "/usr/lib/python3.11",
    "site_packages": "/opt/tsqp-venv/lib/python3.11/site-packages",
    "python_files": "/usr/lib/python3.11/,/opt/tsqp-venv/lib/python3.11/site-packages/",
    "tsqp_dir": "/opt/tsqp-venv/lib/python3.11/site-packages/tsqp",
    "model_dir": "/models/tinyllama",
    "model_files": "config.json,tokenizer.json,tokenizer_config.json,generation_config.json,"
    "model-00001-of-00002.safetensors,model-00002-of-00002.safetensors",
    "etc_files": "nsswitch.conf,hosts",
    "tee_args": "generate",
    "transport": "shm",
    "server_endpoint": "tcp://10.0.0.7:6000",
    "arena_name": "tsqp-enclave-arena",
    "arena_files": "tsqp-enclave-arena",
    "enclave_size": "8G",
    "max_threads": "32",
    "torch_threads": "8",
    "edmm": "0",
    "sgx_debug": "false",
    "remote_attestation": "none",
    "private": "0",
    "pads_dir": "/var/lib/tsqp/pads",
    "direct_pool_key": "",
}
REQUIRED = ("arch_libdir", "entrypoint", "model_dir", "tsqp_dir")


def make_env() -> jinja2.Environment:
    """A stand-in for graminelibos' Jinja environment (same globals, fixed host paths)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.globals["gramine"] = {
        "libos": pathlib.Path("/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so"),
        "runtimedir": lambda libc="glibc": pathlib.Path(RUNTIME_DIR).parent / libc,
    }
    env.globals["python"] = {
        "stdlib": pathlib.Path("/usr/lib/python3.11"),
        "purelib": pathlib.Path("/usr/local/lib/python3.11/dist-packages"),
        "get_sys_path": lambda interpreter: iter(()),
    }
    env.globals["env"] = {}
    env.globals["ldd"] = lambda *binaries: ["/lib/x86_64-linux-gnu/libc.so.6"]
    return env


def render(**overrides: str) -> str:
    variables = {**SAMPLE, **overrides}
    return make_env().from_string(TEMPLATE.read_text()).render(**variables)


def manifest(**overrides: str) -> dict:
    return tomllib.loads(render(**overrides))


def strings(value) -> list[str]:
    """Every string value anywhere in a parsed manifest."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} must appear exactly once in {argv}"
    return argv[argv.index(name) + 1]


def test_runs_tsqp_module_with_fixed_tcp_argv():
    m = manifest()
    assert m["libos"]["entrypoint"] == SAMPLE["entrypoint"]
    argv = m["loader"]["argv"]
    assert argv[:5] == [SAMPLE["entrypoint"], "-S", "-m", "tsqp", "generate"]
    assert flag(argv, "--connect") == "tcp://10.0.0.7:6000"
    assert flag(argv, "--model") == SAMPLE["model_dir"]
    # The host must not be able to change the command the signed enclave runs.
    assert "insecure__use_cmdline_argv" not in m["loader"]
    assert not any("ipc://" in s for s in strings(m))


def test_server_endpoint_defaults_to_loopback_tcp():
    variables = {k: v for k, v in SAMPLE.items() if k != "server_endpoint"}
    m = tomllib.loads(make_env().from_string(TEMPLATE.read_text()).render(**variables))
    assert flag(m["loader"]["argv"], "--connect") == "tcp://127.0.0.1:5555"


@pytest.mark.parametrize("endpoint", ["ipc:///tmp/tsqp.sock", "inproc://x", "127.0.0.1:5555"])
def test_non_tcp_endpoint_is_refused_at_render_time(endpoint):
    with pytest.raises(jinja2.UndefinedError, match="server_endpoint_must_be_tcp"):
        render(server_endpoint=endpoint)


@pytest.mark.parametrize("name", REQUIRED)
def test_required_variables_fail_loudly(name):
    variables = {k: v for k, v in SAMPLE.items() if k != name}
    with pytest.raises(jinja2.UndefinedError, match=name):
        make_env().from_string(TEMPLATE.read_text()).render(**variables)


def test_arena_is_an_untrusted_shm_mount_of_dev_shm():
    mounts = manifest()["fs"]["mounts"]
    shm = [mount for mount in mounts if mount.get("type") == "untrusted_shm"]
    assert shm == [{"type": "untrusted_shm", "path": "/dev/shm", "uri": "dev:/dev/shm"}]
    tmp = [mount for mount in mounts if mount["path"] == "/tmp"]
    assert tmp == [{"type": "tmpfs", "path": "/tmp"}]


def test_arena_file_is_allowed_and_passed_to_the_client():
    m = manifest()
    # Nothing but the arena is readable without a hash check.
    assert m["sgx"]["allowed_files"] == ["dev:/dev/shm/tsqp-enclave-arena"]
    argv = m["loader"]["argv"]
    assert flag(argv, "--transport") == "shm"
    assert flag(argv, "--arena-name") == "tsqp-enclave-arena"


def test_two_arena_files_are_both_allowed():
    m = manifest(arena_name="tsqp-arena", arena_files="tsqp-arena.0, tsqp-arena.1")
    assert m["sgx"]["allowed_files"] == ["dev:/dev/shm/tsqp-arena.0", "dev:/dev/shm/tsqp-arena.1"]
    assert flag(m["loader"]["argv"], "--arena-name") == "tsqp-arena"


def test_empty_arena_list_is_refused():
    with pytest.raises(jinja2.UndefinedError, match="arena_files_is_empty"):
        render(arena_files=" , ")


def test_only_tee_side_model_files_are_trusted():
    trusted = manifest()["sgx"]["trusted_files"]
    model = "/models/tinyllama/"
    from_model = sorted(uri.removeprefix("file:" + model) for uri in trusted if model in uri)
    assert from_model == sorted(SAMPLE["model_files"].split(","))
    for name in ("config.json", "tokenizer.json", "model-00002-of-00002.safetensors"):
        assert f"file:{model}{name}" in trusted
    # Trusted by hash means: listed file by file, never the folder as a whole.
    assert f"file:{model}" not in trusted and f"file:{model[:-1]}" not in trusted


def test_runtime_python_and_packages_are_trusted():
    trusted = manifest()["sgx"]["trusted_files"]
    for uri in (
        "file:/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so",
        f"file:{RUNTIME_DIR}/",
        "file:/lib/x86_64-linux-gnu/",
        "file:/usr/bin/python3.11",
        "file:/usr/lib/python3.11/",
        "file:/opt/tsqp-venv/lib/python3.11/site-packages/",
        "file:/opt/tsqp-venv/lib/python3.11/site-packages/tsqp/",
        "file:/etc/hosts",
    ):
        assert uri in trusted


def test_interpreter_libraries_come_before_the_system_ones():
    """A pyenv or /opt interpreter's libpython, not a system libpython of another patch release."""
    path = manifest(python_prefix="/opt/python3.11")["loader"]["env"]["LD_LIBRARY_PATH"].split(":")
    assert path[:2] == ["/lib", "/opt/python3.11/lib"]
    assert path.index("/opt/python3.11/lib") < path.index("/lib/x86_64-linux-gnu")


def test_mounts_cover_python_paths_without_duplicates():
    m = manifest(tsqp_dir="/src/tsqp/tsqp")
    paths = [mount["path"] for mount in m["fs"]["mounts"]]
    assert len(paths) == len(set(paths))
    assert {"/lib", "/lib/x86_64-linux-gnu", "/usr", "/models/tinyllama", "/src/tsqp/tsqp"} <= set(paths)
    assert "/opt/tsqp-venv/lib/python3.11/site-packages" in paths
    assert "/usr/lib/python3.11" not in paths  # already inside the /usr mount
    lib = next(mount for mount in m["fs"]["mounts"] if mount["path"] == "/lib")
    assert lib["uri"] == f"file:{RUNTIME_DIR}"
    # The venv's packages and an editable tsqp checkout reach the interpreter through PYTHONPATH.
    pythonpath = m["loader"]["env"]["PYTHONPATH"].split(":")
    assert pythonpath == ["/opt/tsqp-venv/lib/python3.11/site-packages", "/src/tsqp"]


def test_enclave_resources_and_safe_defaults():
    sgx = manifest()["sgx"]
    assert sgx["enclave_size"] == "8G"
    assert sgx["max_threads"] == 32
    assert sgx["debug"] is False
    assert sgx["edmm_enable"] is False
    assert sgx["remote_attestation"] == "none"
    env = manifest()["loader"]["env"]
    assert env["OMP_NUM_THREADS"] == env["TORCH_NUM_THREADS"] == "8"
    assert env["TSQP_DOORBELL_FUTEX"] == "0"  # the host cannot wake a futex inside the enclave
    assert manifest()["sys"]["enable_extra_runtime_domain_names_conf"] is True


def test_defaults_when_optional_variables_are_omitted():
    variables = {k: SAMPLE[k] for k in REQUIRED}
    m = tomllib.loads(make_env().from_string(TEMPLATE.read_text()).render(**variables))
    assert m["sgx"]["enclave_size"] == "8G"
    assert m["sgx"]["max_threads"] == 32
    assert m["sgx"]["debug"] is False
    assert m["sgx"]["remote_attestation"] == "none"
    assert m["loader"]["log_level"] == "error"
    assert m["sgx"]["allowed_files"] == ["dev:/dev/shm/tsqp-enclave-arena"]
    assert "file:/models/tinyllama/model.safetensors" in m["sgx"]["trusted_files"]


def test_overrides_reach_the_manifest():
    m = manifest(
        enclave_size="16G",
        max_threads="64",
        torch_threads="24",
        edmm="1",
        sgx_debug="true",
        remote_attestation="dcap",
    )
    assert m["sgx"]["enclave_size"] == "16G"
    assert m["sgx"]["max_threads"] == 64
    assert m["sgx"]["edmm_enable"] is True
    assert m["sgx"]["debug"] is True
    assert m["sgx"]["remote_attestation"] == "dcap"
    assert m["loader"]["env"]["OMP_NUM_THREADS"] == "24"


def test_makefile_builds_signs_and_runs_with_gramine_tools():
    text = MAKEFILE.read_text()
    for tool in ("gramine-manifest", "gramine-sgx-sign", "gramine-direct", "gramine-sgx"):
        assert tool in text
    for target in ("all", "direct", "sgx", "clean"):
        assert re.search(rf"^{target}:", text, re.MULTILINE), target
    assert "ifeq ($(SGX),1)" in text
    for knob in ("MODEL", "SERVER", "ARENA"):
        assert re.search(rf"^{knob}\s*\?=", text, re.MULTILINE), knob


def test_makefile_defines_exactly_the_template_variables():
    defined = set(re.findall(r"-D(\w+)=", MAKEFILE.read_text()))
    assert defined == set(SAMPLE)
    template = TEMPLATE.read_text()
    for name in defined:
        assert re.search(rf"\b{name}\b", template), f"-D{name} is not used by the template"


FAKE_GRAMINE_MANIFEST = """\
#!{python}
# Test double for gramine-manifest: -Dkey=value, SOURCE, rendered to stdout with the test's globals.
import importlib.util, sys
spec = importlib.util.spec_from_file_location("t", {test_file!r})
t = importlib.util.module_from_spec(spec)
spec.loader.exec_module(t)
variables, args = {{}}, []
for arg in sys.argv[1:]:
    if arg.startswith("-D"):
        key, _, value = arg[2:].partition("=")
        variables[key] = value
    else:
        args.append(arg)
with open(args[0]) as f:
    sys.stdout.write(t.make_env().from_string(f.read()).render(**variables))
"""


def run_make(tmp_path: pathlib.Path, *make_args: str) -> tuple[dict, pathlib.Path, pathlib.Path]:
    """gramine/Makefile run on a fake model folder and tsqp package with the test's gramine-manifest:
    the parsed manifest, the model folder, the package folder."""
    build = tmp_path / "gramine"
    build.mkdir()
    for source in (MAKEFILE, TEMPLATE, *GRAMINE_DIR.glob("*.py")):
        shutil.copy(source, build)

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors", "README.md", "x.bin"):
        (model / name).write_text("{}")

    fake_pkg = tmp_path / "site" / "tsqp"
    fake_pkg.mkdir(parents=True)
    (fake_pkg / "__init__.py").write_text("")

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gramine-manifest"
    fake.write_text(FAKE_GRAMINE_MANIFEST.format(python=sys.executable, test_file=str(pathlib.Path(__file__))))
    fake.chmod(0o755)

    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(tmp_path / "site"),
    }
    result = subprocess.run(
        ["make", "-C", str(build), f"MODEL={model}", f"PYTHON={sys.executable}", *make_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return tomllib.loads((build / "tsqp-tee.manifest").read_text()), model, fake_pkg


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_makefile_renders_a_manifest_for_a_model_folder(tmp_path):
    m, model, fake_pkg = run_make(tmp_path, "SERVER=tcp://192.0.2.1:7000", "ARENA=arena-one")

    argv = m["loader"]["argv"]
    assert argv[1:4] == ["-S", "-m", "tsqp"]
    assert flag(argv, "--connect") == "tcp://192.0.2.1:7000"
    assert flag(argv, "--arena-name") == "arena-one"
    assert m["libos"]["entrypoint"] == os.path.realpath(sys.executable)
    assert m["sgx"]["allowed_files"] == ["dev:/dev/shm/arena-one"]
    from_model = {uri for uri in m["sgx"]["trusted_files"] if uri.startswith(f"file:{model}/")}
    assert from_model == {f"file:{model}/{name}" for name in ("config.json", "tokenizer.json", "model.safetensors")}
    assert f"file:{fake_pkg.resolve()}/" in m["sgx"]["trusted_files"]
    assert m["sgx"]["debug"] is False
    # Private mode is off unless asked for.
    assert "--private" not in argv and "--pads-dir" not in argv
    assert not [mount for mount in m["fs"]["mounts"] if mount.get("type") == "encrypted"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize(
    ("tee_args", "names"),
    [
        ("api,--tls,--parallel,3,--slots,threads", ["a.0", "a.1", "a.2"]),
        ("api,--parallel=2,--slots=processes", ["a.0", "a.1"]),
        ("api,--parallel=3,--slots,batched", ["a.0"]),  # the batch model's link alone
        ("api,--tls", ["a.0"]),  # auto: batched in plain mode
        ("api,--attention,server", [f"a.{k}" for k in range(4)]),  # auto: threads, at the default --parallel
        ("api,--private,--parallel,2", ["a.0", "a.1"]),  # auto: threads
        ("generate,--prompt,Hello there", ["a"]),
    ],
)
def test_makefile_allows_one_arena_per_api_slot(tmp_path, tee_args, names):
    """`tsqp api` maps one arena per slot (tsqp/api/slots.py), or one for all batched slots: each is allowed,
    none shared."""
    m, _, _ = run_make(tmp_path, "ARENA=a", f"TEE_ARGS={tee_args}")
    assert m["sgx"]["allowed_files"] == [f"dev:/dev/shm/{name}" for name in names]
    assert flag(m["loader"]["argv"], "--arena-name") == "a"


def test_arena_names_default_is_the_api_default():
    spec = importlib.util.spec_from_file_location("arena_names", GRAMINE_DIR / "arena_names.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from tsqp.api.slots import arena_names
    from tsqp.options import ApiOptions

    assert module.DEFAULT_PARALLEL == ApiOptions.parallel
    assert module.arena_files("x", "api,--slots,threads") == arena_names("x", ApiOptions.parallel)
    assert module.arena_files("x", "api") == arena_names("x", 1)  # auto: batched, one link


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_makefile_private_mode(tmp_path):
    pads = "/srv/tsqp/pads"  # not under tmp_path: the template refuses a pads folder inside /tmp
    # An SGX build (the manifest alone here: signing needs Gramine) seals the pool key to MRENCLAVE.
    m, _, _ = run_make(tmp_path, "PRIVATE=1", f"PADS_DIR={pads}", "SGX=1", "tsqp-tee.manifest")
    argv = m["loader"]["argv"]
    assert "--private" in argv
    assert flag(argv, "--pads-dir") == pads
    assert f"file:{pads}/" in m["sgx"]["allowed_files"]
    assert {
        "type": "encrypted",
        "path": f"{pads}/{KEY_FILE}",
        "uri": f"file:{pads}/{KEY_FILE}",
        "key_name": "_sgx_mrenclave",
    } in m["fs"]["mounts"]
    assert "insecure__keys" not in m["fs"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_makefile_private_mode_for_gramine_direct_keys_the_pool_key_in_the_manifest(tmp_path):
    """gramine-direct has no sealing key: a fixed key of the build folder's, the same on every render."""
    pads = "/srv/tsqp/pads"
    m, _, _ = run_make(tmp_path, "PRIVATE=1", f"PADS_DIR={pads}")
    key = (tmp_path / "gramine" / "direct-pool.key").read_text()
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    assert m["fs"]["insecure__keys"] == {"tsqp_direct_pool_key": key}
    encrypted = [mount for mount in m["fs"]["mounts"] if mount.get("type") == "encrypted"]
    assert [mount["key_name"] for mount in encrypted] == ["tsqp_direct_pool_key"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_makefile_without_model_says_what_to_set(tmp_path):
    shutil.copy(TEMPLATE, tmp_path)
    shutil.copy(MAKEFILE, tmp_path)
    result = subprocess.run(["make", "-C", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Set MODEL=" in result.stdout + result.stderr


def test_docs_cover_the_sgx_workflow():
    doc = (GRAMINE_DIR.parent / "docs" / "sgx.md").read_text()
    for needle in (
        "gramine-sgx-gen-private-key",
        "tsqp serve",
        "SGX=1",
        "gramine-direct",
        "untrusted_shm",
        "tcp://",
    ):
        assert needle in doc, needle


# -- private mode -----------------------------------------------------------------------------------

PADS = "/srv/tsqp/pads"


def private_manifest(**overrides: str) -> dict:
    return manifest(**{"private": "1", "pads_dir": PADS, **overrides})


def test_private_off_renders_exactly_as_without_the_variables():
    without = {k: v for k, v in SAMPLE.items() if k not in ("private", "pads_dir")}
    reference = make_env().from_string(TEMPLATE.read_text()).render(**without)
    assert render() == reference
    for off in ("0", "false", "no", "off", ""):
        # pads_dir means nothing while private mode is off, even one the template would refuse.
        assert render(private=off, pads_dir="relative/pads") == reference, off
    m = manifest()
    assert "--private" not in m["loader"]["argv"] and "--pads-dir" not in m["loader"]["argv"]
    assert m["sgx"]["allowed_files"] == ["dev:/dev/shm/tsqp-enclave-arena"]
    assert not [mount for mount in m["fs"]["mounts"] if mount.get("type") == "encrypted"]
    assert not any("pads" in s or KEY_FILE in s for s in strings(m))


@pytest.mark.parametrize("on", ["1", "true", "yes", "on", "True", "ON"])
def test_private_mode_fixes_the_private_flags_in_argv(on):
    m = private_manifest(private=on)
    argv = m["loader"]["argv"]
    assert argv.count("--private") == 1
    assert flag(argv, "--pads-dir") == PADS
    # Everything else stays as without private mode, in the same order.
    assert [a for a in argv if a not in ("--private", "--pads-dir", PADS)] == manifest()["loader"]["argv"]


def test_private_mode_mounts_the_pads_folder_and_seals_the_pool_key():
    mounts = private_manifest()["fs"]["mounts"]
    paths = [mount["path"] for mount in mounts]
    assert len(paths) == len(set(paths))
    folder = [mount for mount in mounts if mount["path"] == PADS]
    assert folder == [{"path": PADS, "uri": f"file:{PADS}"}]  # a plain host mount (chroot)
    encrypted = [mount for mount in mounts if mount.get("type") == "encrypted"]
    assert encrypted == [
        {
            "type": "encrypted",
            "path": f"{PADS}/{KEY_FILE}",
            "uri": f"file:{PADS}/{KEY_FILE}",
            "key_name": "_sgx_mrenclave",
        }
    ]
    # After the folder's mount, which would hide it otherwise.
    assert paths.index(f"{PADS}/{KEY_FILE}") > paths.index(PADS)
    # No key in the manifest: the sealing key comes from the CPU, bound to MRENCLAVE.
    assert "insecure__keys" not in private_manifest()["fs"]


def test_private_mode_allows_the_pools_and_trusts_nothing_there():
    sgx = private_manifest()["sgx"]
    assert sgx["allowed_files"] == ["dev:/dev/shm/tsqp-enclave-arena", f"file:{PADS}/"]
    assert not [uri for uri in sgx["trusted_files"] if uri.startswith(f"file:{PADS}")]
    # The rest of the enclave is as without private mode.
    assert sgx["trusted_files"] == manifest()["sgx"]["trusted_files"]


def test_private_mode_default_pads_dir_and_trailing_slash():
    variables = {k: v for k, v in SAMPLE.items() if k != "pads_dir"}
    m = tomllib.loads(make_env().from_string(TEMPLATE.read_text()).render(**{**variables, "private": "true"}))
    assert flag(m["loader"]["argv"], "--pads-dir") == "/var/lib/tsqp/pads"
    assert "file:/var/lib/tsqp/pads/" in m["sgx"]["allowed_files"]
    m = private_manifest(pads_dir=PADS + "/")
    assert flag(m["loader"]["argv"], "--pads-dir") == PADS
    assert f"file:{PADS}/" in m["sgx"]["allowed_files"]
    assert f"{PADS}/{KEY_FILE}" in [mount["path"] for mount in m["fs"]["mounts"]]


@pytest.mark.parametrize(
    "pads_dir",
    [
        "pads",  # relative
        "",
        "/",
        "/tmp",  # the in-enclave tmpfs
        "/tmp/pads",
        "/usr/local/tsqp/pads",  # inside a trusted, mounted folder
        "/models",  # around the model folder: its other files would become allowed
        "/models/tinyllama",
        "/models/tinyllama/pads",
        "/opt/tsqp-venv/lib/python3.11/site-packages/pads",
        "/opt",  # around site-packages
        "/dev/shm/pads",
        "/etc/tsqp",
    ],
)
def test_private_mode_refuses_a_pads_dir_that_is_not_a_folder_of_its_own(pads_dir):
    with pytest.raises(jinja2.UndefinedError, match="pads_dir_must_be_a_separate_absolute_folder"):
        render(private="1", pads_dir=pads_dir)


def test_docs_cover_private_mode():
    doc = (GRAMINE_DIR.parent / "docs" / "sgx.md").read_text()
    for needle in (
        "PRIVATE=1",
        "PADS_DIR",
        KEY_FILE,
        'type = "encrypted"',
        'key_name = "_sgx_mrenclave"',
        "sgx.allowed_files",
        "Rollback",
        "--helper-curve-keys",
        "client.key_secret",
        "server.key",
    ):
        assert needle in doc, needle
