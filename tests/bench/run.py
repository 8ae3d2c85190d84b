#!/usr/bin/env python3
"""sparkd's benchmark suite: ``python tests/bench/run.py [--profile DIR] [--scale X] [NAME ...]``.

Names: proxy, coldstart, swap, stampede, waiting_body (none = these, in that order),
recreate (the real vLLM image of tests/images/build.py real-vllm: minutes of CPU
compiling, so only when named), soak (100 000 mixed requests: only when named) and
contention (two clients, two models, one GPU: the swap quantum against FIFO; only when named).  Each benchmark
starts its own real sparkd daemon against real Podman and the fake engine image,
prints what it measured, and ends with one ``RESULT <name> <value> <unit>`` line per
figure.  See tests/bench/README.md for what each figure means and the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import aiohttp
    import podman  # noqa: F401
except ImportError as missing:  # pragma: no cover - a hint, not a feature
    sys.exit(f"run.py needs aiohttp and podman-py ({missing}); use the dev venv, e.g. /tmp/venv/bin/python tests/bench/run.py")

import benchlib
from benchlib import PODMAN_URL, Bench

BENCHMARKS = {
    "proxy": "proxy_bench",
    "coldstart": "coldstart_bench",
    "swap": "swap_bench",
    "stampede": "stampede_bench",
    "waiting_body": "waiting_body_bench",
    "recreate": "recreate_bench",
    "soak": "soak_bench",
    "contention": "contention_bench",
    "fleet": "fleet_bench",
}
DEFAULT = ["proxy", "coldstart", "swap", "stampede", "waiting_body"]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: {', '.join(DEFAULT)})")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record sparkd with py-spy during the hot phases (perturbs the figures: profile and measure in separate runs)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request/iteration counts (e.g. 0.2 for a quick check)")
    parser.add_argument("--rev", metavar="REV",
                        help="run the sparkd of this git revision (git archive into a temporary directory), or of a directory "
                             "holding a sparkd/ package, instead of the working tree: compare commits or patches, or "
                             "measure while sparkd/ is being edited")
    parser.add_argument("--compare", metavar="REV",
                        help="proxy benchmark: also stream through a second daemon running the sparkd of this git revision "
                             "(or directory), in the same rounds: per-chunk CPU of two implementations in one run")
    parser.add_argument("--uvloop", action="store_true",
                        help="experiment: run the sparkd daemons under test on uvloop (sparkd does not use it itself)")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                        help="soak: trace sparkd's Python allocations (FRAMES frames per site) and print the growing "
                             "allocation sites (slows sparkd down and grows its RSS: not for the slope figures)")
    parser.add_argument("--retries", type=int, default=1,
                        help="run a failed benchmark again this many times")
    args = parser.parse_args()
    names = args.names or DEFAULT
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    return await run_all(args, names)


async def run_all(args: argparse.Namespace, names: list[str]) -> int:
    from podman import PodmanClient

    client = PodmanClient(base_url=PODMAN_URL, timeout=120)
    try:
        client.ping()
    except Exception as error:  # noqa: BLE001
        print(f"no Podman service at {PODMAN_URL} ({error}); run tests/setup/host.sh as root", file=sys.stderr)
        return 2
    image = benchlib.engine_image(client)
    exported = False
    if args.rev and (Path(args.rev) / "sparkd" / "__main__.py").exists():
        source, sources = Path(args.rev).resolve(), f"the sparkd package in {Path(args.rev).resolve()}"
    elif args.rev:
        source, commit = benchlib.export_sources(args.rev)
        sources = f"commit {commit} ({args.rev}), exported to {source}"
        exported = True
    else:
        source, sources = None, benchlib.describe_sources()
    bench = Bench(podman=client, image=image, workdir=benchlib.new_workdir(), profile_dir=args.profile, source=source,
                  uvloop=args.uvloop, tracemalloc_frames=args.tracemalloc)
    if args.compare:
        bench.compare_source, bench.compare_label = benchlib.sources_of(args.compare)
    print(f"# sparkd benchmarks: {', '.join(names)}")
    print(f"# {benchlib.machine_line()} python={platform.python_version()} aiohttp={aiohttp.__version__} "
          f"engine image {image}; work dir {bench.workdir}")
    print(f"# sparkd under test: {sources}")
    if args.uvloop:
        print("# EXPERIMENT: the sparkd daemons under test run on uvloop (tests/bench/uvloop_site)")
    print("# Loopback figures on a small shared VM are noisy: compare runs, not single numbers.")
    all_results = []
    failed = []
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"\n==================== {name} ====================", flush=True)
        for _attempt in range(args.retries + 1):
            others = benchlib.other_containers(client, bench.prefixes)
            daemons = benchlib.other_daemons(bench)
            print(f"# {benchlib.machine_line()}; other running containers: {len(others)}; other sparkd daemons: {len(daemons)}")
            began = time.perf_counter()
            try:
                results = await module.run(bench, scale=args.scale)
                break
            except Exception as error:  # noqa: BLE001 - report, maybe retry, go on with the next benchmark
                import traceback

                traceback.print_exc()
                print(f"# {name} FAILED after {time.perf_counter() - began:.1f} s: {type(error).__name__}: {error}")
                for daemon in bench.daemons[-1:]:
                    print(f"# last sparkd log lines ({daemon.log_path}):\n{daemon.logs()[-3000:]}")
                results = None
        if results is None:
            failed.append(name)
            continue
        print(f"\n# {name} took {time.perf_counter() - began:.1f} s; {benchlib.machine_line()}")
        for result in results:
            print(result.line(), flush=True)
        all_results += results
    client.close()
    if exported:
        shutil.rmtree(source, ignore_errors=True)
    if bench.compare_source is not None and bench.compare_label.startswith("commit"):
        shutil.rmtree(bench.compare_source, ignore_errors=True)
    print(f"# daemon logs and configs: {bench.workdir}")
    if failed:
        print(f"# failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(asyncio.run(main()))
