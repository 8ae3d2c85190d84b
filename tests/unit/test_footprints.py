"""Issue 16 point 1: measured footprints drive admission, a start needs room for its load peak,
a claim below what was measured warns with the config line, and the history keeps them."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace

from structlog.testing import capture_logs
from test_scheduler import FakeLifecycle, config_with, model, serve, serving

from sparkd.config import GpuConfig
from sparkd.observe.history import History
from sparkd.scheduler.events import FootprintMeasured
from sparkd.scheduler.footprint import Footprint
from sparkd.scheduler.outcomes import Started
from sparkd.scheduler.scheduler import Scheduler
from sparkd.scheduler.state import ModelState

GIB = 1024**3
TOTAL = 100 * GIB


class MeasuringLifecycle(FakeLifecycle):
    """Loads that measure what a real unified-memory machine would: ``sizes[name] = (peak, ready)``."""

    def __init__(self, tmp, sizes):
        super().__init__(tmp)
        self.sizes = sizes

    async def await_ready(self, runner, on_progress, launched):
        await asyncio.sleep(self.start_delay)
        peak, ready = self.sizes[runner.name]
        return Started(took=self.start_delay, peak=peak, ready=ready, total=TOTAL)


def both_running(scheduler: Scheduler) -> bool:
    return all(r.state is ModelState.READY for r in scheduler.runners.values())


async def test_a_claim_below_the_measured_size_is_admitted_by_the_measured_size(tmp_path):
    # Both claim 0.1, so by the configuration they run side by side; each measures 0.6 once ready.
    fake = MeasuringLifecycle(tmp_path, {"a": (70 * GIB, 60 * GIB), "b": (70 * GIB, 60 * GIB)})
    models = [replace(model("a", 0.1), source="/etc/sparkd/models.d/a.toml"), model("b", 0.1)]
    scheduler = serving(Scheduler(config_with(models), fake, unified_memory=True))
    with capture_logs() as logs:
        assert await serve(scheduler, "a") == "a"
    a = scheduler.runners["a"]
    assert a.footprint == Footprint(peak=70 * GIB, ready=60 * GIB, total=TOTAL, spec_hash=a.spec.spec_hash)
    assert (a.claim, a.load_claim) == (0.6, 0.7)
    assert scheduler.lease.holders["a"] == 0.6  # ready: its measured resident size, not the configured 0.1
    warning = a.claim_warnings[0]
    assert "set gpu_memory = 0.61 in [models.a] in /etc/sparkd/models.d/a.toml" in warning, warning
    assert any(e["event"] == "model_claim_below_measured" and e["key"] == "models.a.gpu_memory" for e in logs)
    assert await serve(scheduler, "b") == "b"  # b's first load is by its claim: it fits beside a
    assert both_running(scheduler)
    # Now both are measured: a request for a (stopped by nobody yet) is fine, but after a stop each
    # start must fit its load peak beside what runs: a waits for b to go.
    await scheduler.stop_model("a", 5)
    assert await serve(scheduler, "a") == "a"
    assert scheduler.runners["b"].state is ModelState.STOPPED


async def test_a_start_needs_room_for_its_load_peak(tmp_path):
    # b is resident 0.3 but peaks at 0.7 while it loads; a holds 0.5: b fits once ready, not while loading.
    fake = MeasuringLifecycle(tmp_path, {"a": (50 * GIB, 50 * GIB), "b": (70 * GIB, 30 * GIB)})
    scheduler = serving(Scheduler(config_with([model("a", 0.5), model("b", 0.3)]), fake, unified_memory=True))
    scheduler.remember_footprint("b", Footprint(peak=70 * GIB, ready=30 * GIB, total=TOTAL))
    assert await serve(scheduler, "a") == "a"
    assert await serve(scheduler, "b") == "b"
    assert scheduler.runners["a"].state is ModelState.STOPPED  # swapped out so that b's peak fits
    assert scheduler.lease.holders == {"b": 0.3}  # once ready it holds its resident size again


async def test_footprints_survive_in_the_history(tmp_path):
    history = History(tmp_path / "history.sqlite3")
    await history.open()
    history.on_event(FootprintMeasured("a", 70 * GIB, 60 * GIB, None, TOTAL, None, 1.0))
    history.on_event(FootprintMeasured("a", 75 * GIB, 61 * GIB, 2 * GIB, TOTAL, 2, 2.0))
    history.on_event(FootprintMeasured("b", None, None, None, None, None, 3.0))  # nothing measured: not kept
    assert await history.footprints() == {"a": Footprint(peak=75 * GIB, ready=61 * GIB, asleep=2 * GIB, total=TOTAL, sleep_level=2)}
    await history.close()
    reopened = History(tmp_path / "history.sqlite3")
    await reopened.open()
    assert (await reopened.footprints())["a"].ready == 61 * GIB
    await reopened.close()


async def test_discrete_gpus_measure_nothing_and_admit_by_configuration(tmp_path):
    scheduler = serving(Scheduler(config_with([model("a", 0.5)]), FakeLifecycle(tmp_path)))
    assert await serve(scheduler, "a") == "a"
    runner = scheduler.runners["a"]
    assert runner.footprint.view() is None and runner.claim == 0.5 and not runner.claim_warnings
    assert scheduler.config.gpu == GpuConfig(devices=(), memory_budget=0.94)


async def test_a_footprint_measured_on_another_container_spec_is_forgotten(tmp_path):
    fake = MeasuringLifecycle(tmp_path, {"a": (70 * GIB, 60 * GIB)})
    config = config_with([model("a", 0.1)])
    scheduler = serving(Scheduler(config, fake, unified_memory=True))
    spec = scheduler.runners["a"].spec.spec_hash
    scheduler.remember_footprint("a", Footprint(ready=60 * GIB, total=TOTAL, spec_hash="another"))
    assert scheduler.runners["a"].footprint == Footprint() and scheduler.runners["a"].claim == 0.1
    scheduler.remember_footprint("a", Footprint(ready=60 * GIB, total=TOTAL))  # an older sparkd's: kept
    assert scheduler.runners["a"].claim == 0.6

    assert await serve(scheduler, "a") == "a"
    assert scheduler.runners["a"].footprint.spec_hash == spec
    # The model's container spec changes while it runs: the figures hold for the running container
    # until it stops, then the configured claim stands until the new container is measured.
    changed = replace(config, models={"a": replace(config.models["a"], env={"VLLM_SOMETHING": "1"})})
    with capture_logs() as logs:
        scheduler.apply_config(changed)
        assert scheduler.runners["a"].claim == 0.6
        await scheduler.stop_model("a", 5)
    runner = scheduler.runners["a"]
    assert runner.footprint == Footprint() and runner.claim == 0.1 and not runner.claim_warnings
    assert any(e["event"] == "model_footprint_forgotten" and e["measured_on"] == spec for e in logs), logs
    assert await serve(scheduler, "a") == "a"
    assert runner.footprint.spec_hash == runner.spec.spec_hash != spec and runner.claim == 0.6


async def test_the_history_keeps_the_spec_and_adds_the_column_to_an_older_database(tmp_path):
    path = tmp_path / "history.sqlite3"
    older = sqlite3.connect(path)
    older.executescript(
        "CREATE TABLE footprints (model TEXT PRIMARY KEY, peak_bytes INTEGER, ready_bytes INTEGER, "
        "asleep_bytes INTEGER, sleep_level INTEGER, total_bytes INTEGER NOT NULL, measured_at REAL NOT NULL);"
        f"INSERT INTO footprints VALUES ('old', NULL, {GIB}, NULL, NULL, {TOTAL}, 1.0);"
    )
    older.close()
    history = History(path)
    await history.open()
    assert await history.footprints() == {"old": Footprint(ready=GIB, total=TOTAL)}
    history.on_event(FootprintMeasured("a", 2 * GIB, GIB, None, TOTAL, None, 2.0, "0123abcd"))
    assert (await history.footprints())["a"].spec_hash == "0123abcd"
    await history.close()
