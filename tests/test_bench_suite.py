"""benchmarks/suite.py runs end to end and writes the JSON it documents (shape only: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_chain_writes_the_documented_keys(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--quick", "--only", "chain",
                           "--workers", "1", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result) == {"meta", "throughput", "scale"}
    assert {"mode", "repeats", "sizes", "duration_s", "commit"} <= set(result["meta"])
    (chain,) = result["throughput"]
    assert chain["case"] == "chain" and chain["workers"] == "1 x c5" and chain["executions"] == 200
    assert {"time_s", "execs_per_s", "runs_per_s", "redis_cmds_per_exec", "peak_rss_mb", "samples_s"} <= set(chain)
    assert "(a) chain of 200" in proc.stdout
