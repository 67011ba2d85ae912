"""bench/gpu.sh, the one-shot GPU measurement script, run here on the CPU with the tiny preset: every run
it makes works and lands in one JSON, so that a lent GPU's few minutes are not spent finding a typo.
And the `--compare` plan: a GPU server adds the full-TEE baseline (transformers on the TEE's cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from tsqp.measure.bench import reference_plan


def test_gpu_script_runs_every_measurement_into_one_json(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OUT": str(out),
        "DEVICE": "cpu",
        "PRESET": "tiny",
        "TOKENS": "16",
        "DECODE": "3",
        "WHEELS": str(tmp_path / "no-wheels"),  # not a checkout's .whl/ (the device image's wheels, for its Python)
    }
    done = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads((out / "gpu.json").read_text())
    assert sorted(runs) == ["bf16_pipeline_off", "bf16_pipeline_on", "decode", "f32", "private"]
    assert not [name for name, run in runs.items() if run.get("failed")], (out / "runs.log").read_text()[-3000:]
    assert runs["bf16_pipeline_on"]["pipelined"] and not runs["bf16_pipeline_off"]["pipelined"]
    assert runs["private"]["private"] and runs["private"]["ratio_plain"] > 0
    assert runs["decode"]["decode"]["same_tokens"] is not None
    assert (out / "bf16.trace.json").is_file() and (out / "private.trace.json").is_file()
    assert len(list(out.iterdir())) <= 8  # what a device run can bring back


def test_compare_adds_the_full_tee_baseline_when_the_server_is_not_the_tees_cpu_float32():
    assert "full_tee" not in reference_plan("cpu", "float32")  # sdpa on the CPU in float32 is that run
    assert reference_plan("cuda:0", "bfloat16")["full_tee"] == ("sdpa", "cpu", "float32")
    assert reference_plan("cuda:0", "float32")["sdpa"] == ("sdpa", "cuda:0", "float32")
    assert reference_plan("cpu", "bfloat16")["full_tee"] == ("sdpa", "cpu", "float32")
