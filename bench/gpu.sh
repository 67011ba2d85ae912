#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one run, for a machine lent for a few minutes (the
# `device` tool: about 8 minutes of an H200 with 16 CPU cores for the TEE). From the repository root:
#
#   bash bench/gpu-wheels.sh          # here, once: what the device image lacks, as wheels in .whl/
#   bash bench/gpu.sh                 # there (carry .whl): writes $OUT/gpu.json, $OUT/runs.log, traces
#
# DEVICE, PRESET, TOKENS and DECODE default to cuda:0, tinyllama-1.1b, 1024 and 32; the tests run this
# script on the CPU with the tiny preset (tests/system/test_gpu_script.py). A run that fails or outlasts its
# share of the time is recorded as failed in gpu.json; the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
DEVICE=${DEVICE:-cuda:0}
PRESET=${PRESET:-tinyllama-1.1b}
TOKENS=${TOKENS:-1024}
DECODE=${DECODE:-32}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TSQP_CACHE=${TSQP_CACHE:-/tmp/tsqp-cache} TSQP_QUIET_SERVER=1
WHEELS=${WHEELS:-.whl}  # the device image's missing packages (bench/gpu-wheels.sh); the tests point it elsewhere
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tsqp-site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/tsqp-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 - "$DEVICE" <<'PY' || exit 1
import sys, torch, zmq, cryptography, transformers  # everything a run needs, or one clear line now
if sys.argv[1].startswith("cuda") and not torch.cuda.is_available():
    sys.exit("gpu.sh: CUDA is not available on this machine")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
PY
python3 -m tsqp preset "$PRESET" > /dev/null || exit 1
: > "$OUT/runs.log"

run() {  # run NAME FLAGS...: one `tsqp bench`, its figures in $OUT/NAME.json
  local name=$1; shift
  echo "== $name: tsqp bench --preset $PRESET $*" | tee -a "$OUT/runs.log"
  timeout "$RUN_TIMEOUT" python3 -m tsqp bench --preset "$PRESET" --device "$DEVICE" "$@" --json "$OUT/$name.json" \
    >> "$OUT/runs.log" 2>&1 || echo "$name: failed (exit $?)" | tee -a "$OUT/runs.log"
}

run bf16_pipeline_off --tokens "$TOKENS" --dtype bfloat16 --pipeline off
run bf16_pipeline_on --tokens "$TOKENS" --dtype bfloat16 --pipeline on --trace "$OUT/bf16.trace.json"
run f32 --tokens "$TOKENS" --dtype float32 --compare
run private --tokens "$TOKENS" --dtype bfloat16 --private --compare --trace "$OUT/private.trace.json"
run decode --tokens 128 --decode "$DECODE" --dtype bfloat16 --compare

python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {}
for name in ("bf16_pipeline_off", "bf16_pipeline_on", "f32", "private", "decode"):
    path = out / f"{name}.json"
    runs[name] = json.loads(path.read_text()) if path.exists() else {"failed": True}
    runs[name].pop("detail", None)  # the per-op table stays in runs.log
    path.unlink(missing_ok=True)
(out / "gpu.json").write_text(json.dumps(runs, indent=2))
print("wrote", out / "gpu.json", "failed:", [n for n, r in runs.items() if r.get("failed")])
PY
