"""In-process (no Redis) throughput and scaling benchmark for FlowRuntime.

    python benchmarks/bench_inprocess.py            # full sizes: 1,000 and 10,000 nodes
    python benchmarks/bench_inprocess.py --quick    # CI-friendly: 100 and 1,000 nodes
    python benchmarks/bench_inprocess.py --json     # machine-readable results on stdout
    python benchmarks/bench_inprocess.py --profile  # + cProfile of one large chain run (measured part only)

Measures, each as the MEDIAN of several runs (see benchmarks/README.md for what every number means):
  * no-op node executions per second on an N-node chain (a -> b -> c ...);
  * the same on a 1 -> N -> 1 fan-out / fan-in (start -> N parallel no-ops -> one ``all`` join);
  * wall time of a small vs a large chain (and fan), and the per-node cost ratio (1.0x = linear);
  * baselines from the same process: bare asyncio awaits / tasks, and blueprint build (parse_blueprint) time.

Building the blueprint (document + parse_blueprint) and the FlowRuntime is setup, never inside a timed run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/bench_inprocess.py` from anywhere, without installing
    sys.path.insert(0, str(ROOT))

from flowcraft_cli.blueprint import Blueprint  # noqa: E402
from flowcraft_cli.loading import parse_blueprint  # noqa: E402
from flowcraft_cli.registry import NodeRegistry  # noqa: E402
from flowcraft_cli.runtime import FlowRuntime  # noqa: E402

SUPERLINEAR_RATIO = 2.0  # large per-node cost > 2x small per-node cost: flagged as super-linear
CONCURRENCY = 32  # FlowRuntime's default


# ------------------------------------------------------------------------------------------ workload


async def noop(ctx: Any) -> Any:
    return ctx.input


def make_registry() -> NodeRegistry:
    reg = NodeRegistry()
    reg.register("noop", noop)
    return reg


def chain_doc(n: int) -> dict[str, Any]:
    """n0 -> n1 -> ... -> n{n-1}: n node executions, strictly one after another."""
    return {
        "id": f"chain-{n}",
        "nodes": [{"id": f"n{i}", "uses": "noop"} for i in range(n)],
        "edges": [{"source": f"n{i}", "target": f"n{i + 1}"} for i in range(n - 1)],
    }


def fan_doc(n: int) -> dict[str, Any]:
    """start -> w0..w{n-1} (parallel) -> join (``all``): n + 2 node executions."""
    nodes: list[dict[str, Any]] = [{"id": "start", "uses": "noop"}]
    nodes += [{"id": f"w{i}", "uses": "noop"} for i in range(n)]
    nodes.append({"id": "join", "uses": "noop", "config": {"joinStrategy": "all"}})
    edges = [{"source": "start", "target": f"w{i}"} for i in range(n)]
    edges += [{"source": f"w{i}", "target": "join"} for i in range(n)]
    return {"id": f"fan-{n}", "nodes": nodes, "edges": edges}


SHAPES: dict[str, tuple[Callable[[int], dict[str, Any]], Callable[[int], int]]] = {
    "chain": (chain_doc, lambda n: n),
    "fan": (fan_doc, lambda n: n + 2),
}


# ------------------------------------------------------------------------------------------ timing


def _stats(samples: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": samples}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def baseline_asyncio(n: int, repeats: int) -> dict[str, Any]:
    """What the event loop alone costs for n trivial steps: n sequential awaits of a coroutine, and n tasks
    created then awaited one by one (FlowRuntime makes one task per job)."""

    async def trivial(x: int) -> int:
        return x

    async def awaits() -> float:
        t0 = time.perf_counter()
        for i in range(n):
            await trivial(i)
        return time.perf_counter() - t0

    async def tasks() -> float:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for i in range(n):
            await loop.create_task(trivial(i))
        return time.perf_counter() - t0

    out: dict[str, Any] = {"n": n}
    for name, fn in (("awaits", awaits), ("tasks", tasks)):
        samples = []
        for _ in range(repeats):
            gc.collect()
            samples.append(asyncio.run(fn()))
        st = _stats(samples)
        st["per_op_us"] = st["median_s"] / n * 1e6
        out[name] = st
    return out


def build(shape: str, n: int, registry: NodeRegistry, repeats: int) -> tuple[Blueprint, dict[str, Any]]:
    """Setup, timed on its own: the document, and parse_blueprint (validation included)."""
    make_doc, _ = SHAPES[shape]
    doc_s, parse_s = [], []
    bp: Blueprint | None = None
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        doc = make_doc(n)
        t1 = time.perf_counter()
        bp = parse_blueprint(doc, source=f"<bench {shape}-{n}>", registry=registry)
        t2 = time.perf_counter()
        doc_s.append(t1 - t0)
        parse_s.append(t2 - t1)
    assert bp is not None
    return bp, {"doc_median_s": statistics.median(doc_s), "parse": _stats(parse_s)}


class RunFailed(RuntimeError):
    pass


def _check(shape: str, n: int, result: Any) -> None:
    expected = SHAPES[shape][1](n)
    if result.status != "completed":
        raise RunFailed(f"{shape}-{n}: status {result.status!r}, reason {result.reason!r}")
    if len(result.outputs) != expected:
        raise RunFailed(f"{shape}-{n}: {len(result.outputs)} node outputs, expected {expected}")
    if shape == "chain" and result.outputs[f"n{n - 1}"] != {"seed": 1}:
        raise RunFailed(f"{shape}-{n}: last output {result.outputs[f'n{n - 1}']!r}")
    if shape == "fan" and len(result.outputs["join"]) != n:
        raise RunFailed(f"{shape}-{n}: join saw {len(result.outputs['join'])} inputs, expected {n}")


def measure(shape: str, n: int, bp: Blueprint, registry: NodeRegistry, repeats: int,
            profile: cProfile.Profile | None = None) -> dict[str, Any]:
    """Median wall time of ``FlowRuntime.run`` (fresh runtime + MemoryStore each time, built untimed).

    Within the same run, the public ``on_event`` hook stamps the time of the last job's ``end``. The
    ``engine_only`` time (start to that stamp) covers node execution only. The ``tail`` time (that stamp to
    the return of ``run()``) is mostly the final read-back (``result()``, which is ``view.read_run``). Each is
    the median over runs of its per-run value. The hook costs one ``perf_counter()`` per event."""
    executed = SHAPES[shape][1](n)
    run_s, engine_s, tail_s = [], [], []
    for _ in range(repeats):
        loop = asyncio.new_event_loop()
        last_end = [0.0]

        def on_event(kind: str, _job: Any, last_end: list[float] = last_end) -> None:
            if kind == "end":
                last_end[0] = time.perf_counter()

        try:
            runtime = FlowRuntime({bp.id: bp}, registry, concurrency=CONCURRENCY, on_event=on_event)
            gc.collect()
            if profile:
                profile.enable()
            t0 = time.perf_counter()
            result = loop.run_until_complete(runtime.run(bp.id, {"seed": 1}))
            t1 = time.perf_counter()
            if profile:
                profile.disable()
            _check(shape, n, result)
        finally:
            loop.close()
        run_s.append(t1 - t0)
        engine_s.append(last_end[0] - t0)
        tail_s.append(t1 - last_end[0])
    st = _stats(run_s)
    med = st["median_s"]
    engine = max(statistics.median(engine_s), 1e-9)
    st.update({
        "shape": shape, "n": n, "executions": executed, "runs": repeats,
        "execs_per_s": executed / med,
        "per_node_us": med / executed * 1e6,
        "tail_median_s": statistics.median(tail_s),
        "engine_only_s": engine,
        "engine_only_samples_s": engine_s,
        "engine_only_execs_per_s": executed / engine,
        "engine_only_per_node_us": engine / executed * 1e6,
    })
    return st


# ------------------------------------------------------------------------------------------ report


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f} ms" if s < 1 else f"{s:,.2f} s"


def render(res: dict[str, Any]) -> str:
    lines = []
    meta = res["meta"]
    lines.append(f"flowcraft in-process benchmark  (Python {meta['python']}, {meta['platform']}, "
                 f"concurrency={meta['concurrency']}{', QUICK' if meta['quick'] else ''})")
    if meta.get("loadavg_start") is not None:
        lines.append(f"load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}, "
                     f"on {os.cpu_count()} CPUs")
    lines.append("")
    b = res["baseline"]
    e = res.get("baseline_end", b)
    lines.append(f"Baseline (bare asyncio, {b['n']:,} trivial steps, median of {len(b['awaits']['samples_s'])}; "
                 "taken at start / at end of the benchmark):")
    lines.append(f"  {b['n']:,} sequential awaits   {_ms(b['awaits']['median_s']):>10} / {_ms(e['awaits']['median_s']):<10}"
                 f"{b['awaits']['per_op_us']:7.3f} / {e['awaits']['per_op_us']:.3f} us/await")
    lines.append(f"  {b['n']:,} create_task+await   {_ms(b['tasks']['median_s']):>10} / {_ms(e['tasks']['median_s']):<10}"
                 f"{b['tasks']['per_op_us']:7.3f} / {e['tasks']['per_op_us']:.3f} us/task")
    lines.append("")
    lines.append("Setup, not in the measured runs (document build + parse_blueprint, median):")
    for key, bst in res["build"].items():
        lines.append(f"  {key:<12} doc {_ms(bst['doc_median_s']):>10}   parse_blueprint {_ms(bst['parse']['median_s']):>10}")
    lines.append("")
    hdr = (f"{'case':<12}{'execs':>8}{'runs':>5}{'median':>12}{'min .. max':>24}{'us/node':>9}"
           f"{'execs/s':>10}{'tail/read':>11}{'engine us/node':>15}{'engine execs/s':>15}{'x task':>8}")
    lines.append("Runs (FlowRuntime.run wall time; engine = start .. last node done; tail/read = the rest, "
                 "mostly the final read_run view):")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    task_us = (b["tasks"]["per_op_us"] + e["tasks"]["per_op_us"]) / 2
    for key, c in res["cases"].items():
        lines.append(
            f"{key:<12}{c['executions']:>8,}{c['runs']:>5}{_ms(c['median_s']):>12}"
            f"{_ms(c['min_s']) + ' .. ' + _ms(c['max_s']):>24}{c['per_node_us']:>9.1f}{c['execs_per_s']:>10,.0f}"
            f"{_ms(c['tail_median_s']):>11}{c['engine_only_per_node_us']:>15.1f}"
            f"{c['engine_only_execs_per_s']:>15,.0f}{c['per_node_us'] / task_us:>7.0f}x")
    lines.append("")
    lines.append("Scaling (per-node cost large / small; 1.0x = linear, > "
                 f"{SUPERLINEAR_RATIO:.1f}x flagged super-linear):")
    for shape, s in res["scaling"].items():
        flag = "  <-- SUPER-LINEAR" if s["superlinear"] else ""
        lines.append(
            f"  {shape:<6} {s['small']:>6,} -> {s['large']:>6,} nodes: wall {_ms(s['small_median_s'])} -> "
            f"{_ms(s['large_median_s'])} (x{s['wall_ratio']:.1f} for x{s['size_ratio']:.0f} nodes);  per node "
            f"{s['per_node_ratio']:.2f}x, engine only {s['engine_only_per_node_ratio']:.2f}x{flag}")
    if res["superlinear"]:
        lines.append("")
        lines.append("Super-linear growth detected: profile with  python benchmarks/bench_inprocess.py --profile")
    if res.get("profile"):
        lines.append("")
        lines.append(res["profile"])
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (100 / 1,000 nodes) for CI")
    ap.add_argument("--json", action="store_true", help="print results as JSON on stdout (progress on stderr)")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile one large-chain run (measured part only) and print the top entries")
    ap.add_argument("--small", type=int, help="small size (default 1000, quick 100)")
    ap.add_argument("--large", type=int, help="large size (default 10000, quick 1000)")
    ap.add_argument("--repeats-small", type=int, default=5)
    ap.add_argument("--repeats-large", type=int, default=3)
    args = ap.parse_args(argv)

    small = args.small or (100 if args.quick else 1_000)
    large = args.large or (1_000 if args.quick else 10_000)
    reps = {small: args.repeats_small, large: args.repeats_large}
    registry = make_registry()

    res: dict[str, Any] = {
        "meta": {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
                 "quick": args.quick, "concurrency": CONCURRENCY, "small": small, "large": large,
                 "superlinear_threshold": SUPERLINEAR_RATIO, "loadavg_start": _loadavg()},
        "baseline": {}, "build": {}, "cases": {}, "scaling": {},
    }

    _log("baseline: bare asyncio ...")
    res["baseline"] = baseline_asyncio(large, 5)

    # warm-up: imports, expression caches, allocator; not reported
    bp, _ = build("chain", 50, registry, 1)
    measure("chain", 50, bp, registry, 1)

    failed: list[str] = []
    for shape in ("chain", "fan"):
        for n in (small, large):
            key = f"{shape}-{n}"
            _log(f"{key}: build ...")
            bp, bst = build(shape, n, registry, min(reps[n], 3))
            res["build"][key] = bst
            _log(f"{key}: {reps[n]} runs ...")
            try:
                res["cases"][key] = measure(shape, n, bp, registry, reps[n])
            except RunFailed as e:
                failed.append(str(e))
                _log(f"FAILED {e}")

    for shape in ("chain", "fan"):
        a, b = res["cases"].get(f"{shape}-{small}"), res["cases"].get(f"{shape}-{large}")
        if not (a and b):
            continue
        ratio = b["per_node_us"] / a["per_node_us"]
        res["scaling"][shape] = {
            "small": small, "large": large, "size_ratio": large / small,
            "small_median_s": a["median_s"], "large_median_s": b["median_s"],
            "wall_ratio": b["median_s"] / a["median_s"],
            "per_node_ratio": ratio,
            "engine_only_per_node_ratio": b["engine_only_per_node_us"] / a["engine_only_per_node_us"],
            "superlinear": ratio > SUPERLINEAR_RATIO,
        }
    res["superlinear"] = any(s["superlinear"] for s in res["scaling"].values())
    res["failed"] = failed

    if args.profile:
        _log(f"profile: chain-{large} ...")
        bp, _ = build("chain", large, registry, 1)
        prof = cProfile.Profile()
        measure("chain", large, bp, registry, 1, profile=prof)
        parts = []
        for order, top in (("cumulative", 20), ("tottime", 12)):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(order).print_stats(top)
            text = buf.getvalue()
            parts.append(f"cProfile of one chain-{large} run (FlowRuntime.run only), top {top} by {order}:\n"
                         + text[text.find("   ncalls"):].rstrip())
        res["profile"] = "\n\n".join(parts)

    _log("baseline again (end) ...")
    res["baseline_end"] = baseline_asyncio(large, 5)
    res["meta"]["loadavg_end"] = _loadavg()
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(render(res))
        for f in failed:
            print(f"FAILED: {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
