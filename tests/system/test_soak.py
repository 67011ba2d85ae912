"""The short soak (bench/soak.py): clients generating at once, one SIGKILLed, the server restarted once."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_short_soak_with_a_killed_client_and_a_server_restart(tmp_path):
    out = tmp_path / "soak.json"
    command = [sys.executable, str(REPO / "bench" / "soak.py"), "--clients", "4", "--generations", "3"]
    result = subprocess.run([*command, "--kills", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    figures = json.loads(out.read_text())
    assert result.returncode == 0, (figures, result.stderr[-2000:])
    assert figures["ok"] and figures["mismatches"] == [] and figures["shm_left"] == []
    assert len(figures["killed"]) == 1 and figures["restarts"] == 1 and not figures["server_crashed"]
    assert figures["generations_checked"] >= 3 * 3  # the three survivors' generations, and the killed one's
    assert figures["after"]["sessions"] == 0 and figures["after"]["cache_bytes"] == figures["baseline"]["cache_bytes"]
