"""The README's Python API example runs as written (against the test Redis), so it cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _snippet(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```python", text.index(title)) + len("```python")
    return text[start:text.index("```", start)]


def test_python_api_example_runs(redis_url, redis_sync):
    code = _snippet("## Python API").replace("redis://localhost:6379/0", redis_url)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("completed {'order_id': 'A-1', 'status': 'paid'")
    assert lines[1].startswith("completed {'order_id': 'A-1', 'status': 'paid'")
    assert "'failed_runs': 0" in lines[2]


def test_first_command_is_the_bundled_example():
    text = (ROOT / "README.md").read_text()
    first = text[text.index("```bash") + len("```bash"):text.index("```", text.index("```bash") + 7)].strip()
    assert first.startswith("python3 -m pip install -e . && flowcraft run order-processing --input ")
    second_start = text.index("```bash", text.index("```bash") + 7) + len("```bash")
    second = text[second_start:text.index("```", second_start)].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert second.split("&& ")[-1] in ci  # .ci/run runs the README's test command
