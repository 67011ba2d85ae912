"""bench/verify_cost.py: verified and unverified prefills paired, per tree and variant, through cost_table's runner."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO

PAIR = re.compile(r"round (\d) here (on|off): prefill ([\d.]+) s verified, ([\d.]+) s not \(checks ([\d.]+) s\)")
SUMMARY = re.compile(
    r"here (on|off): median prefill [\d.]+ s verified, [\d.]+ s not; checks [\d.]+ s \([\d.]+%\); "
    r"verification's cost -?[\d.]+ s \(-?[\d.]+% of the verified prefill, median of 2 paired differences\)"
)


def test_verify_cost_pairs_each_variant_with_and_without_checks(tiny_model):
    command = [sys.executable, str(REPO / "bench" / "verify_cost.py"), "--model", str(tiny_model), "--tokens", "20"]
    command += ["--rounds", "2", "--variant", "on=--pipeline on", "--variant", "off=--pipeline off"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    pairs = PAIR.findall(result.stdout)
    assert sorted((round_, variant) for round_, variant, *_ in pairs) == [
        ("0", "off"),
        ("0", "on"),
        ("1", "off"),
        ("1", "on"),
    ], result.stdout
    assert all(
        float(verified) > 0 and float(unverified) > 0 and float(checks) > 0
        for *_, verified, unverified, checks in pairs
    )
    assert sorted(match.group(1) for match in SUMMARY.finditer(result.stdout)) == ["off", "on"], result.stdout
