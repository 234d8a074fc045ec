"""A/B: this checkout against an earlier commit, alternated in one command (the machine is shared and noisy:
only figures taken side by side compare).

    python3 benchmarks/ab.py c6808ad                       # (c) on one worker, 3 rounds
    python3 benchmarks/ab.py HEAD~3 --only chain,fan --rounds 5

The earlier commit is checked out once into a worktree under /tmp (``git worktree add --detach``) and reused.
Each round runs ``benchmarks/suite.py --workers 1 --repeats 3`` of the base, then of this checkout (the
working tree as it is, uncommitted changes included), each with its own redis-server and workers, and reads
the figures from their JSON. It prints every round, then per case the median execs/s and cmds/exec of each
side and their ratio. Only the throughput cases (chain, fan, many) are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worktree(commit: str) -> Path:
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"flowcraft-ab-{sha[:12]}"
    if not (path / "benchmarks" / "suite.py").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), sha],
                       check=True, capture_output=True)
    return path


def run_suite(checkout: Path, only: str) -> dict[str, tuple[float, float]]:
    """case label -> (execs/s, cmds/exec) from one suite run of ``checkout``."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, str(checkout / "benchmarks" / "suite.py"), "--only", only, "--workers", "1",
                        "--repeats", "3", "--json", out.name], cwd=checkout, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        figures = json.loads(Path(out.name).read_text())
    return {f["label"]: (f["execs_per_s"], f["redis_cmds_per_exec"]) for f in figures.get("throughput", [])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the commit to compare with (anything git rev-parse takes)")
    parser.add_argument("--only", default="many", help="throughput cases: chain,fan,many (default many)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations, base then this checkout (default 3)")
    args = parser.parse_args()
    base = worktree(args.base)
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for i in range(1, args.rounds + 1):
        for side, checkout in (("base", base), ("this", ROOT)):
            for label, figure in run_suite(checkout, args.only).items():
                samples.setdefault(label, {}).setdefault(side, []).append(figure)
                print(f"round {i} {side:4}  {label:<22} {figure[0]:8,.0f} execs/s  {figure[1]:5.1f} cmds/exec",
                      flush=True)
    print(f"\nmedians over {args.rounds} rounds, base = {args.base}")
    for label, sides in samples.items():
        b = statistics.median(f[0] for f in sides["base"])
        t = statistics.median(f[0] for f in sides["this"])
        bc = statistics.median(f[1] for f in sides["base"])
        tc = statistics.median(f[1] for f in sides["this"])
        print(f"{label:<22} base {b:8,.0f}  this {t:8,.0f} execs/s  ratio {t / b:.2f}   cmds/exec {bc:.1f} -> {tc:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
