"""Numbers unchanged: run the same seed-0 experiments on two checkouts and compare every number.

A refactor that should not change results proves it with this script, on one machine:

    python benchmarks/numbers_unchanged.py capture --tree /path/to/old/checkout --output before.json
    python benchmarks/numbers_unchanged.py capture --tree .                     --output after.json
    python benchmarks/numbers_unchanged.py compare before.json after.json
    python benchmarks/numbers_unchanged.py compare-dirs WORK_BEFORE WORK_AFTER   # run folders, as they finish

``capture`` runs, with the code and the benchmark scripts of ``--tree``: the six demo runs, and seed 0
of ``benchmarks/dont_stop_learning.py``, ``benchmarks/online_lifelong.py`` and
``benchmarks/moe_adapters.py`` with their default sizes. It keeps every number a run reports except
wall-clock timings, dates, versions and paths. ``compare`` requires exact equality (NaN equals NaN)
and lists every difference. Each capture uses its own empty feature cache, so no feature computed
by one checkout is reused by the other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# Keys whose values are wall-clock measurements, dates, versions or locations: they differ between
# any two runs and say nothing about the numbers of the method.
# ``config_digest`` is a hash of the whole config, which changes whenever the schema gains a field.
# ``data`` holds the datasets' content fingerprints, which change whenever their definition does.
VOLATILE = {"timing", "created", "versions", "host", "config", "output_dir", "train_seconds", "eval_seconds",
            "seconds", "train_samples_per_second", "images_per_second", "name", "config_digest", "data"}

SUITES = ("demo", "dont_stop_learning", "online_lifelong", "moe_adapters")


def comparable(value):
    """``value`` without its volatile keys, with tuples as lists."""
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items() if key not in VOLATILE}
    if isinstance(value, (list, tuple)):
        return [comparable(item) for item in value]
    return value


def capture(tree: Path, suites: list[str], threads: int, work: Path | None = None,
            output: Path | None = None, only: list[str] | None = None, memory_cache: bool = False) -> dict:
    sys.path[:0] = [str(tree / "src"), str(tree / "benchmarks")]
    import torch

    torch.set_num_threads(threads)
    import clipcl

    if not Path(clipcl.__file__).resolve().is_relative_to((tree / "src").resolve()):
        raise SystemExit(f"clipcl was imported from {clipcl.__file__}, not from {tree}/src")
    from clipcl.run import run_experiment

    work = work or Path(tempfile.mkdtemp(prefix="numbers-unchanged-"))
    print(f"run folders under {work}", file=sys.stderr, flush=True)
    os.environ["CLIPCL_CACHE"] = str(work / "cache")
    captured: dict[str, dict] = {}

    def wanted(suite: str, name: str) -> bool:
        """``--only``: run just these runs (``suite/name``, or a whole ``suite``)."""
        return not only or f"{suite}/{name}" in only or suite in only

    def run(config) -> dict:
        if memory_cache:  # no run sees features another run wrote to disk
            config.eval.cache_dir = ""
        return run_experiment(config, show_progress=False)

    def record(suite: str, name: str, results: dict) -> None:
        captured.setdefault(suite, {})[name] = comparable(results)
        if output is not None:  # after every run, so an interrupted capture still compares what it ran
            output.write_text(json.dumps(captured, indent=1, sort_keys=True) + "\n")
        print(f"{time.strftime('%H:%M:%S')} {suite}/{name} done", file=sys.stderr, flush=True)

    def run_demo() -> None:
        from clipcl.config import load_config
        from clipcl.demo import METHODS, STRATEGY_OVERRIDES, STREAMS, demo_config_path

        for stream in STREAMS:
            for method in METHODS:
                if not wanted("demo", f"{stream}/{method}"):
                    continue
                config = load_config(demo_config_path(stream), STRATEGY_OVERRIDES[method]
                                     + [f"output_dir={work / 'demo' / stream / method}"])
                record("demo", f"{stream}/{method}", run(config))
    def run_dont_stop_learning() -> None:
        import dont_stop_learning as benchmark

        args = argparse.Namespace(train_samples=960, test_samples=500, heldout_samples=300, lr=1e-4,
                                  output_dir=str(work / "dont_stop_learning"))
        for setting in benchmark.SETTINGS:
            for method in benchmark.METHODS:
                if not wanted("dont_stop_learning", f"{setting}/{method}"):
                    continue
                config = benchmark.run_config(setting, method, 0, args)
                record("dont_stop_learning", f"{setting}/{method}", run(config))
    def run_online_lifelong() -> None:
        import online_lifelong as benchmark

        args = argparse.Namespace(online_iter=3, eval_period=150, test_samples=500,
                                  output_dir=str(work / "online_lifelong"))
        for stream in benchmark.STREAMS:
            for method in benchmark.METHODS:
                if not wanted("online_lifelong", f"{stream}/{method}"):
                    continue
                config = benchmark.run_config(stream, method, 0, args)
                record("online_lifelong", f"{stream}/{method}", run(config))
    def run_moe_adapters() -> None:
        import moe_adapters as benchmark

        args = argparse.Namespace(epochs=3, train_samples=640, test_samples=200,
                                  output_dir=str(work / "moe_adapters"))
        for method in benchmark.METHODS:
            if wanted("moe_adapters", method):
                record("moe_adapters", method, benchmark.run_one(method, 0, args))
    runners = {"demo": run_demo, "dont_stop_learning": run_dont_stop_learning,
               "online_lifelong": run_online_lifelong, "moe_adapters": run_moe_adapters}
    for suite in suites:  # in the order asked for
        runners[suite]()
    return captured


def differences(before, after, path: str = "") -> list[str]:
    """Every place where ``after`` differs from ``before``, as readable lines."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after)):
            where = f"{path}/{key}"
            if key not in after:
                found.append(f"{where}: missing after")
            elif key not in before:
                found.append(f"{where}: new after")
            else:
                found += differences(before[key], after[key], where)
        return found
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [f"{path}: length {len(before)} -> {len(after)}"]
        return [line for index, (a, b) in enumerate(zip(before, after)) for line in differences(a, b, f"{path}[{index}]")]
    if isinstance(before, float) and isinstance(after, float) and math.isnan(before) and math.isnan(after):
        return []
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("capture", help="run the experiments with one checkout's code")
    run.add_argument("--tree", default=".", help="the checkout whose src/ and benchmarks/ to use")
    run.add_argument("--output", required=True)
    run.add_argument("--suites", default=",".join(SUITES))
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--memory-cache", action="store_true",
                     help="feature caches in memory only: the old online code's numbers depended on the disk cache")
    run.add_argument("--only", default="", help="comma-separated suite/name of the runs to run (or whole suites)")
    run.add_argument("--work", help="folder for the run folders and the feature cache (default: a new temporary one)")
    check = commands.add_parser("compare", help="compare two captures exactly")
    check.add_argument("before")
    check.add_argument("after")
    folders = commands.add_parser("compare-dirs", help="compare the results.json of the run folders both captures "
                                                       "have finished (each capture prints its folder)")
    folders.add_argument("before")
    folders.add_argument("after")
    args = parser.parse_args()
    if args.command == "compare-dirs":
        compared, found = 0, []
        for path in sorted(Path(args.before).rglob("results.json")):
            other = Path(args.after) / path.relative_to(args.before)
            if other.exists():
                compared += 1
                found += differences(comparable(json.loads(path.read_text())), comparable(json.loads(other.read_text())),
                                     str(path.parent.relative_to(args.before)))
        print("\n".join(found) if found else f"identical: {compared} finished runs, every reported number equal")
        raise SystemExit(1 if found else 0)
    if args.command == "capture":
        suites = [suite for suite in args.suites.split(",") if suite]
        unknown = sorted(set(suites) - set(SUITES))
        if unknown:
            parser.error(f"unknown suite {unknown[0]}; choose from {', '.join(SUITES)}")
        started = time.perf_counter()
        captured = capture(Path(args.tree).resolve(), suites, args.threads, Path(args.work) if args.work else None,
                           Path(args.output), [part for part in args.only.split(",") if part], args.memory_cache)
        captured["_meta"] = {"tree": str(Path(args.tree).resolve()), "suites": suites,
                             "minutes": round((time.perf_counter() - started) / 60, 1)}
        Path(args.output).write_text(json.dumps(captured, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
        return
    before = json.loads(Path(args.before).read_text())
    after = json.loads(Path(args.after).read_text())
    before.pop("_meta", None)
    after.pop("_meta", None)
    found = differences(before, after)
    runs = sum(len(group) for group in before.values())
    if found:
        print(f"{len(found)} differences over {runs} runs:")
        print("\n".join(found))
        raise SystemExit(1)
    print(f"identical: {runs} runs, every reported number equal")


if __name__ == "__main__":
    main()
