"""Put on PYTHONPATH by the soak benchmark: a probe inside the sparkd process under test.

sparkd has no debug hook, and the soak must not need one: Python imports this module
at start-up (before sparkd), and when ``SPARKD_SOAK_PROBE`` names a unix socket path
it serves, from a daemon thread, one JSON command per line:

* ``{"op": "sample"}``: a full garbage collection, then the event loop's task count
  (counted on the loop's own thread) and the most common task coroutines, Python's
  thread count, ``sys.getallocatedblocks()``, the number of objects the collector
  tracks, glibc's ``mallinfo2`` (C memory in use and free but kept), and
  tracemalloc's traced bytes when tracing;
* ``{"op": "snapshot", "path": P}``: a tracemalloc snapshot dumped to ``P`` (the
  benchmark loads and compares them: growing allocation sites).

``SPARKD_SOAK_TRACEMALLOC=N`` starts tracemalloc with N frames before anything else
is imported (off by default: it slows sparkd down and grows its RSS).  Benchmark
code only; nothing here is part of sparkd.
"""

import asyncio
import collections
import ctypes
import ctypes.util
import gc
import json
import os
import socket
import sys
import threading
import tracemalloc
from concurrent.futures import Future
from typing import Any

_loops: list[asyncio.AbstractEventLoop] = []


def _record_loops() -> None:
    """Remember the loops asyncio.run creates (the daemon's loop): tasks are counted on it."""
    make = asyncio.events.new_event_loop

    def new_event_loop() -> asyncio.AbstractEventLoop:
        loop = make()
        _loops.append(loop)
        return loop

    asyncio.events.new_event_loop = new_event_loop  # asyncio.run looks it up here at call time


def _tasks_on_loop() -> dict[str, Any]:
    loop = next((each for each in reversed(_loops) if each.is_running()), None)
    if loop is None:
        return {"tasks": None, "task_names": {}}
    answer: Future[dict[str, Any]] = Future()

    def count() -> None:
        tasks = asyncio.all_tasks(loop)
        names = collections.Counter(getattr(t.get_coro(), "__qualname__", "?") for t in tasks)
        answer.set_result({"tasks": len(tasks), "task_names": dict(names.most_common(12))})

    loop.call_soon_threadsafe(count)
    return answer.result(timeout=30)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc() -> dict[str, int] | None:
    """glibc's own account of C-level memory (all arenas): in use (small + mmapped) and free but kept."""
    try:
        mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks, "arena": info.arena}


def _sample() -> dict[str, Any]:
    gc.collect()
    out = _tasks_on_loop()
    out.update(
        py_threads=threading.active_count(),
        blocks=sys.getallocatedblocks(),
        gc_objects=len(gc.get_objects()),
        traced=tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None,
        malloc=_malloc(),
    )
    return out


def _snapshot(path: str) -> dict[str, Any]:
    if not tracemalloc.is_tracing():
        return {"error": "tracemalloc is off (SPARKD_SOAK_TRACEMALLOC)"}
    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    snapshot.dump(path)
    return {"path": path, "traced": tracemalloc.get_traced_memory()[0]}


def _serve(path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    while True:
        connection, _ = server.accept()
        with connection, connection.makefile("rwb") as stream:
            for line in stream:
                command = json.loads(line)
                try:
                    if command["op"] == "sample":
                        answer = _sample()
                    elif command["op"] == "snapshot":
                        answer = _snapshot(command["path"])
                    else:
                        answer = {"error": f"unknown op {command['op']!r}"}
                except Exception as error:  # noqa: BLE001 - report to the benchmark
                    answer = {"error": f"{type(error).__name__}: {error}"}
                stream.write(json.dumps(answer).encode() + b"\n")
                stream.flush()


def _chain_other_sitecustomize() -> None:
    """Run the next sitecustomize on PYTHONPATH too (``run.py --uvloop`` puts its own there)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        candidate = os.path.join(entry, "sitecustomize.py")
        if entry and os.path.abspath(entry) != here and os.path.exists(candidate):
            with open(candidate) as handle:
                exec(compile(handle.read(), candidate, "exec"), {"__name__": "sitecustomize_chained"})
            return


_frames = int(os.environ.get("SPARKD_SOAK_TRACEMALLOC", "0") or 0)
if _frames > 0:
    tracemalloc.start(_frames)
_probe = os.environ.get("SPARKD_SOAK_PROBE")
if _probe:
    _record_loops()
    threading.Thread(target=_serve, args=(_probe,), name="soak-probe", daemon=True).start()
_chain_other_sitecustomize()
