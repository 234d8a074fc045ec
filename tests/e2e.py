"""Helpers for end-to-end tests: a project folder, the real ``flowcraft`` CLI, real worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

NODES = '''
import asyncio, os, time
from pathlib import Path
from flowcraft_cli import node, NodeResult

def _log(ctx, what):
    path = ctx.params.get("log")
    if path:
        with open(path, "a") as f:
            f.write(f"{ctx.node_id} {what} {os.getpid()}\\n")

@node("noop")
async def noop(ctx):
    _log(ctx, "run")
    return ctx.node_id

@node("slow")
async def slow(ctx):
    _log(ctx, "start")
    await asyncio.sleep(float(ctx.params.get("seconds", 1)))
    _log(ctx, "end")
    return {"slept": ctx.params.get("seconds", 1)}

@node("join")
def join(ctx):
    _log(ctx, "run")
    return sorted(ctx.input) if isinstance(ctx.input, dict) else ctx.input

@node("decide")
def decide(ctx):
    return NodeResult(output={"total": 150}, action="ok")

@node("step")
async def step(ctx):
    await asyncio.sleep(0.01 * (ctx.params["value"] % 3))  # uneven, so the two workers interleave
    return NodeResult(output=ctx.params["value"], action=ctx.params["action"])
'''


class Project:
    def __init__(self, root: Path, redis_url: str, *, job_timeout: float = 5, shutdown_wait: float = 10,
                 extra_blueprints: dict[str, str] | None = None, lease: float | None = None) -> None:
        self.root = root
        self.redis_url = redis_url
        self.queue = f"e2e-{uuid.uuid4().hex[:8]}"
        self.log = root / "calls.log"
        (root / "blueprints").mkdir(parents=True, exist_ok=True)
        (root / "e2e_nodes.py").write_text(NODES)
        lease_line = "" if lease is None else f", lease_seconds: {lease}"
        (root / "flowcraft.yaml").write_text(textwrap.dedent(f"""
            redis: {{url: "{redis_url}"}}
            queue: {{name: {self.queue}}}
            blueprints: [./blueprints]
            registry: [e2e_nodes]
            state: {{ttl_seconds: 600}}
            worker: {{concurrency: 8, job_timeout_seconds: {job_timeout}, version_grace_seconds: 5,
                      shutdown_wait_seconds: {shutdown_wait}{lease_line}}}
        """))
        wide_nodes = "\n".join(f"  - {{id: n{i:02d}, uses: noop}}" for i in range(50))
        wide_edges = "\n".join(f"  - {{source: start, target: n{i:02d}}}\n  - {{source: n{i:02d}, target: end}}" for i in range(50))
        blueprints = {
            "wide": f"nodes:\n  - {{id: start, uses: noop}}\n{wide_nodes}\n  - {{id: end, uses: join}}\nedges:\n{wide_edges}\n",
            "chain": textwrap.dedent(f"""
                nodes:
                  - {{id: start, uses: noop, params: {{log: "{self.log}"}}}}
                  - {{id: slow, uses: slow, params: {{seconds: 1.5, log: "{self.log}"}}}}
                  - {{id: side, uses: noop, params: {{log: "{self.log}"}}}}
                  - {{id: join, uses: join, params: {{log: "{self.log}"}}}}
                edges:
                  - {{source: start, target: slow}}
                  - {{source: start, target: side}}
                  - {{source: slow, target: join}}
                  - {{source: side, target: join}}
            """),
            "routed": textwrap.dedent("""
                nodes:
                  - {id: a, uses: decide}
                  - {id: b, uses: noop}
                  - {id: c, uses: noop}
                edges:
                  - {source: a, target: b, action: ok}
                  - {source: a, target: c, action: reject}
            """),
            **(extra_blueprints or {}),
        }
        for name, text in blueprints.items():
            (root / "blueprints" / f"{name}.yaml").write_text(text)
        self.workers: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCRAFT_")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def cli(self, *args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "flowcraft_cli", *args], cwd=self.root, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"flowcraft {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def cli_json(self, *args: str, timeout: float = 60) -> Any:
        proc = self.cli(*args, "--json", timeout=timeout)
        assert proc.stdout.strip(), f"no JSON on stdout (exit {proc.returncode}): {proc.stderr}"
        return json.loads(proc.stdout)

    def start_worker(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        out = open(self.root / f"worker{n}.out", "wb")
        err = open(self.root / f"worker{n}.err", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "flowcraft_cli", "worker", "start", *extra], cwd=self.root,
                                env={**self.env(), **(env or {})}, stdout=out, stderr=err)
        self.workers.append(proc)
        wait_for(lambda: b"flowcraft worker" in (self.root / f"worker{n}.out").read_bytes() or proc.poll() is not None,
                 30, f"worker {n} to start")
        assert proc.poll() is None, (self.root / f"worker{n}.err").read_text()
        return proc

    def worker_log(self, n: int) -> str:
        return (self.root / f"worker{n}.err").read_text()

    def wait_run(self, run_id: str, timeout: float = 90, statuses: tuple[str, ...] = ("completed", "failed")) -> Any:
        return wait_for(lambda: (v := self.cli_json("inspect", run_id))["status"] in statuses and v, timeout,
                        f"run {run_id} to reach {statuses}", interval=0.3)

    def stop_all(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def slow_fan_yaml(log: object, branches: list[str], seconds: float = 1) -> str:
    """``start -> each of branches (slow, ``seconds``) -> join``, logging to ``log``."""
    nodes = "\n".join(f"  - {{id: {b}, uses: slow, params: {{seconds: {seconds}, log: \"{log}\"}}}}" for b in branches)
    edges = "\n".join(f"  - {{source: start, target: {b}}}\n  - {{source: {b}, target: join}}" for b in branches)
    return (f"nodes:\n  - {{id: start, uses: noop}}\n{nodes}\n  - {{id: join, uses: join, params: {{log: \"{log}\"}}}}\n"
            f"edges:\n{edges}\n")


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
