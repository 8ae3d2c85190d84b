"""Where requests wait for their model, and where swaps are decided.

``acquire`` returns once the model is ready and the request is counted in
flight; ``release`` ends it.  Every change (a request queued or gone, a model
ready, stopped or failed) calls ``pump``, a synchronous pass over the queue
that grants, starts, drains and evicts; the slow work it decides runs in tasks
(``Lifecycle``), which return an outcome and call ``pump`` again when they finish.

The scheduler is the only writer of a model's state and of the lease: ``_move``
moves a model from the state it is expected to be in to a new one, checks the
move against ``state.ALLOWED``, sets the lease share the new state implies
(``share_for``) and emits one ``Transitioned`` event.

A model whose weights are not in its cache is PULLING before it is admitted: its
download holds no lease share and no load slot, so it evicts nothing and the
other models keep serving and loading meanwhile (``_weights_first``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, Literal

import structlog

from ..config import Config, ModelConfig
from ..engine.lastwords import telling_lines
from ..engine.progress import LoadProgress
from ..errors import (
    ApiError,
    GatewayTimeout,
    ModelUnavailable,
    ServiceUnavailable,
    TooManyRequests,
)
from ..fleet.nodes import runs_here
from ..runtime.eventstream import ContainerEvent
from ..runtime.spec import ContainerSpec, render
from .contract import ModelLifecycle
from .eventlog import log_event
from .events import (
    Adopted,
    Cause,
    Event,
    FailureCause,
    FootprintMeasured,
    Idle,
    KeepUtility,
    Listener,
    LoadFinished,
    OperatorAction,
    Progress,
    Requested,
    RestartAfterLoss,
    Shutdown,
    SleepFailed,
    SwapCalledOff,
    SwapFor,
    Transitioned,
    WeightsPulled,
)
from .footprint import Footprint, claim_warning
from .lease import Eviction, Holder, Lease, plan
from .outcomes import Adoption, Failed, Slept, Started, StopFailed, Stopped, Woke
from .quantum import Quantum, protected_until, quantum_length
from .queue import (
    KeyQueueFull,
    QueueBytesFull,
    QueueFull,
    QueueLimits,
    Waiter,
    WaitQueue,
)
from .refusal import busy_refusal
from .runner import Failure, ModelRunner
from .state import ALLOWED, ModelState

log = structlog.get_logger("sparkd.scheduler")
S = ModelState

REAPER_PERIOD_S = 1.0
STOP_RETRY_FIRST_S = 2.0
STOP_RETRY_MAX_S = 60.0
LIVE = frozenset({S.STARTING, S.READY, S.DRAINING, S.STOPPING, S.SLEEPING, S.WAKING})
"""States in which the model's container may run."""
STOPPABLE = frozenset(set(ModelState) - {S.STOPPED, S.STOPPING, S.PULLING})
"""States a stop applies to; a pull is no container to stop (cancelling its task ends it)."""


class Scheduler:
    def __init__(self, config: Config, lifecycle: ModelLifecycle, *, unified_memory: bool = False) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.unified_memory = unified_memory
        """The GPU allocates from system memory (the memory probe found a DGX Spark's unified memory)."""
        self.lease = Lease(config.gpu.memory_budget)
        self.queue = WaitQueue(queue_limits(config))
        self.runners: dict[str, ModelRunner] = {}
        self._listeners: list[Listener] = [log_event]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()
        self._closing = False
        self._operator_requests: dict[str, str] = {}
        self._restarts: dict[str, str] = {}
        """Models a watch gave up that start again once they fit (``model_lost`` with a code in
        ``RESTARTED_AFTER``), with that code."""
        """Models an operator asked to stop or sleep: drained, then stopped/slept."""
        self._transient: set[str] = set()
        """Runners of models outside the configuration: worker leases granted to a head sparkd."""
        self._serving = asyncio.Event()
        """Set once running containers are adopted: before that a start could collide with adoption."""
        self.gpu_missing: str | None = None
        """Why the GPU devices look unavailable (no CDI spec), if they do: GPU utility models wait."""
        self._pump_timer: asyncio.TimerHandle | None = None
        """Pumps again when a swap quantum that holds a waiter back may end (``_pump_at``)."""
        self._pump_timer_at = 0.0
        self._handing: tuple[str, float] | None = None
        """The model the holders drain for, and since when (time.monotonic()): where its swap began."""
        self._checking: set[str] = set()
        """Models whose cache is being looked at before their admission (``_weights_first``)."""
        self._weights_present: set[str] = set()
        """Models whose weights were found in their cache since their last start began: admitted without another look."""
        for model in local_models(config):
            self.runners[model.name] = self._new_runner(model)

    def _new_runner(self, model: ModelConfig) -> ModelRunner:
        return ModelRunner(config=model, spec=render(self.config, model), unified_memory=self.unified_memory)

    def add_transient(self, model: ModelConfig, spec: ContainerSpec) -> ModelRunner:
        """A model that is not in the configuration (a peer's worker lease) until ``remove_transient``."""
        runner = ModelRunner(config=model, spec=spec, unified_memory=self.unified_memory)
        self.runners[model.name] = runner
        self._transient.add(model.name)
        return runner

    async def remove_transient(self, name: str) -> None:
        runner = self.runners[name]
        if runner.state is not S.STOPPED:
            await self.stop_model(name, self.config.lifecycle.stop_timeout_s + 30)
        self._transient.discard(name)
        self.runners.pop(name, None)
        self.pump()

    def model_lost(self, name: str, reason: str, code: str = "model_failed") -> None:
        """Something the model depends on is gone (a peer's worker), or a watch gave it up (``code``
        says which: ``memory_guard``, ``engine_wedged``): fail it and free its share."""
        runner = self.runners.get(name)
        if runner is None or runner.state not in (S.STARTING, S.READY, S.DRAINING, S.WAKING, S.SLEEPING):
            return
        runner.loss = reason  # a start or wake under way fails with it; a stream it breaks is told it
        if self._busy(runner):
            runner.died.set()
        else:
            self._spawn(runner, self._run_lost(runner, reason, code))

    async def _run_lost(self, runner: ModelRunner, reason: str, code: str = "model_failed") -> None:
        """The container died, or a peer it needs, or a task of the model crashed: clean up, fail it."""
        try:
            outcome = await self.lifecycle.stop_after_loss(runner, reason, kill=code in KILLED_AFTER)
        except Exception as error:  # the model must end FAILED whatever the clean-up did
            log.error("model_clean_up_crashed", model=runner.name, error=repr(error), exc_info=error)
            outcome = Failed(reason)
        if self._fail(runner, LIVE, replace(outcome, code=code)):
            self._fail_waiters(runner, self._failure_error(runner))
            if code in RESTARTED_AFTER and not self._closing and runner.name not in self._operator_requests:
                self._restarts[runner.name] = code
                self.pump()

    def apply_config(self, config: Config) -> None:
        """Switch to a reloaded configuration without killing anything.

        New models get runners; a running model whose container spec changed
        keeps serving and is re-created at its next start; a model that was
        removed or disabled is stopped once idle.
        """
        self.config = config
        self.lifecycle.apply_config(config)
        self.lease.budget = config.gpu.memory_budget
        self.queue.limits = queue_limits(config)
        self._weights_present.clear()  # a reload may name other repositories
        enabled = {m.name: m for m in local_models(config)}
        for name, runner in list(self.runners.items()):
            if name in self._transient:
                continue
            model = enabled.get(name)
            if model is None:
                self._fail_waiters(runner, ServiceUnavailable(f"model {name} was removed or disabled by a configuration reload"))
                self._operator_requests[name] = "stop"
                self._forget_if_gone(runner)
                continue
            spec = render(config, model)
            if spec.spec_hash != runner.spec.spec_hash and runner.state is not S.STOPPED:
                runner.stale_spec = True
                log.info("model_spec_changed", model=name, state=runner.state.value, applies="at its next start")
            runner.config, runner.spec = model, spec
            if runner.state in (S.STOPPED, S.FAILED):
                _forget_stale_footprint(runner)
        for name, model in enabled.items():
            if name not in self.runners:
                self.runners[name] = self._new_runner(model)
        self.pump()

    # -- observers ---------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every event (``events.Transitioned``, ``LoadFinished``,
        ``Progress``): sd_notify STATUS, metrics, history, the status page."""
        self._listeners.append(listener)

    def _emit(self, event: Event) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in self._listeners:
            listener(event)

    # -- the one place a model's state and lease share change -------------------------

    def _move(self, runner: ModelRunner, expected: ModelState | frozenset[ModelState], new: ModelState, cause: Cause) -> bool:
        """Move ``runner`` from an ``expected`` state to ``new``: the state, the fields it implies,
        the lease share, one event.  Any other current state is a bug: logged loudly, nothing moves."""
        old = runner.state
        allowed = expected if isinstance(expected, frozenset) else frozenset({expected})
        if old not in allowed or new not in ALLOWED[old]:
            log.error(
                "transition_unexpected", model=runner.name, state=old.value, expected=sorted(s.value for s in allowed),
                new=new.value, reason=cause.describe(new),
            )
            return False
        now = time.time()
        runner.state, runner.cause, runner.state_since = new, cause, now
        _enter(runner, new, cause, now)
        share = share_for(runner, old, new, self.lease.holders.get(runner.name))
        if share is None:
            self.lease.release(runner.name)
        elif new is S.SLEEPING or isinstance(cause, Adopted) or (new is S.READY and old in (S.STARTING, S.WAKING)):
            # In use already, whatever the budget says: what a load or a sleep measured, an adopted container.
            self.lease.hold_measured(runner.name, share)
        else:
            self.lease.grant(runner.name, share)
        self._emit(Transitioned(runner.name, old, new, cause, now))
        return True

    def _fail(self, runner: ModelRunner, expected: ModelState | frozenset[ModelState], outcome: Failed) -> bool:
        cause = FailureCause(outcome.message, outcome.log_lines, needs_operator=outcome.needs_operator, code=outcome.code)
        return self._move(runner, expected, S.FAILED, cause)

    def _progress(self, runner: ModelRunner) -> Callable[[LoadProgress], None]:
        """Where the lifecycle reports a start's load progress read from the engine's log."""
        def report(progress: LoadProgress) -> None:
            if runner.state in (S.STARTING, S.PULLING):
                runner.progress = progress
                self._emit(Progress(runner.name, progress, time.time()))
        return report

    # -- the request path ----------------------------------------------------------

    def acquire_now(self, name: str) -> ModelRunner | None:
        """Count one request in flight on model ``name`` if it is ready now, without waiting."""
        runner = self.runners[name]
        if runner.state is not S.READY:
            return None
        runner.in_flight += 1
        return runner

    async def acquire(self, name: str, *, key: str | None = None, body_bytes: int = 0, priority: int = 0) -> ModelRunner:
        """Wait until model ``name`` is ready and count one request in flight on it.

        ``key`` (the caller's key name) and ``body_bytes`` (what the request holds while it
        waits) count against the queue's per-key and body-bytes limits; ``priority`` (its
        key's) orders the queue when the GPU changes hands.
        """
        ready = self.acquire_now(name)
        if ready is not None:
            return ready
        runner = self.runners[name]
        if self._closing:
            raise ServiceUnavailable("sparkd is shutting down and takes no new requests; retry shortly", retry_after=5)
        if not self._serving.is_set():
            await self._serving.wait()
            return await self.acquire(name, key=key, body_bytes=body_bytes, priority=priority)
        if self.config.lifecycle.policy == "reject":
            self._refuse_if_busy(runner)
        waiter = Waiter(name, key=key, body_bytes=body_bytes, priority=priority)
        try:
            self.queue.push(waiter)
        except KeyQueueFull:
            log.info("request_refused", reason="key_queue_limit", key=key, model=name, limit=self.queue.limits.per_key)
            raise TooManyRequests(
                f"the key {key!r} has {self.queue.limits.per_key} requests waiting for models already "
                "(lifecycle.queue_per_key); wait for them to be served, or send fewer at once",
                retry_after=self.retry_after(name),
                code="key_queue_limit",
            ) from None
        except QueueBytesFull:
            log.info(
                "request_refused", reason="queue_body_bytes", model=name, body_bytes=body_bytes,
                waiting_bytes=self.queue.body_bytes, limit=self.queue.limits.body_bytes,
            )
            raise ServiceUnavailable(
                f"the requests waiting for models hold {self.queue.body_bytes} bytes of bodies; this one "
                f"({body_bytes} bytes) would pass the limit of {self.queue.limits.body_bytes} "
                "(lifecycle.queue_body_bytes); retry later",
                retry_after=self.retry_after(name),
                code="queue_body_bytes",
            ) from None
        except QueueFull:
            raise ServiceUnavailable(
                f"the wait queue is full ({self.queue.limit} requests waiting for models); retry later "
                "or raise lifecycle.queue_size",
                retry_after=self.retry_after(name),
                code="queue_full",
            ) from None
        log.debug("request_queued", model=name, depth=len(self.queue))
        self.pump()
        timeout = self.config.lifecycle.queue_timeout_s
        try:
            done = await self._wait_queued(waiter, runner, timeout)
        except asyncio.CancelledError:
            self._abandon(waiter, runner)
            raise
        if not done and self.queue.remove(waiter):
            self.pump()
            raise GatewayTimeout(
                f"model {name} was not ready after waiting {timeout:.0f}s (lifecycle.queue_timeout_s): "
                f"{self._why_waiting(runner)}",
                retry_after=self.retry_after(name),
                code="queue_timeout",
            )
        waiter.future.result()  # raises the model's failure, if it failed
        return runner

    async def _wait_queued(self, waiter: Waiter, runner: ModelRunner, timeout: float) -> bool:
        """Whether the waiter was served (or failed) within ``timeout``.  A download is no stuck queue:
        while the model pulls its weights the timeout counts anew, so a waiter gives up at most
        ``timeout`` after the pull ended (a pull that stops making progress fails, and its waiters with it)."""
        while True:
            done, _ = await asyncio.wait((waiter.future,), timeout=timeout)
            if done or runner.state is not S.PULLING:
                return bool(done)

    def _abandon(self, waiter: Waiter, runner: ModelRunner) -> None:
        """The client went away while waiting: leave the queue, or hand back a grant."""
        if self.queue.remove(waiter):
            log.debug("request_left_queue", model=runner.name)
            self.pump()
        elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
            self.release(runner)

    def release(self, runner: ModelRunner) -> None:
        runner.in_flight -= 1
        runner.last_used = time.monotonic()
        if runner.in_flight == 0 and (runner.state is not S.READY or len(self.queue)):
            self.pump()  # a waiter may now evict it (its swap quantum counts it out of work soon)

    # -- decisions -------------------------------------------------------------------

    def pump(self) -> None:
        """Grant, start, drain and evict so the queue moves; never awaits.

        Called after every change; safe to call any time (it only acts on what changed).
        """
        victims: dict[str, Eviction] = {}
        head: str | None = None
        for name in self.queue.models():
            runner = self.runners[name]
            if runner.state is S.READY:
                self._grant(runner)
                continue
            if self._weights_first(runner):
                head = head or name  # a quick look at its cache: nobody overtakes it meanwhile
                continue
            if self._busy(runner) or runner.state not in (S.STOPPED, S.FAILED, S.SLEEPING):
                continue  # starting, waking, draining or stopping: wait for the change
            if head is not None:
                continue  # first come, first served: one model makes room at a time
            if runner.state is S.FAILED and self._in_backoff(runner):
                self._fail_waiters(runner, self._failure_error(runner))
                continue
            decision = plan(
                name,
                runner.claim if runner.state is S.SLEEPING else runner.load_claim,
                runner.config.lifecycle,
                self.lease.holders.get(name, 0.0),
                self._holders(),
                self.lease.budget,
            )
            if decision.verdict == "admit":
                if not self._admit(runner, Requested()):
                    head = name  # its turn comes when the load under way ends; nobody overtakes it
            elif decision.verdict == "impossible":
                measured = f" (measured: {runner.footprint.describe()})" if runner.footprint.total else ""
                self._fail_waiters(runner, ModelUnavailable(
                    f"model {name} cannot be loaded: {decision.reason}{measured}; change its gpu_memory or "
                    "gpu.memory_budget",
                    code="claim_impossible",
                ))
            else:
                head = name
                held_until = self._held_by_quantum([e.name for e in decision.evictions], self.queue.priority(name))
                if held_until is None:
                    victims = {e.name: e for e in decision.evictions}
                    if self._handing is None or self._handing[0] != name:
                        self._handing = (name, time.monotonic())
                else:
                    self._pump_at(held_until)  # it waits; nobody overtakes it meanwhile
                    self._handing = None  # no swap under way: its swap begins when the quantum lets it
        self._call_off_swaps(victims)
        if head is not None:
            self._evict(victims, head)
        self._carry_out_operator_requests()
        if head is None:
            self._handing = None
            self._keep_utility_models()
            self._restart_lost_models()

    def _weights_first(self, runner: ModelRunner) -> bool:
        """True while the model's cache is looked at before its admission: the look begins now (a
        stopped or failed model with weights to manage, not seen present since its last start) or
        runs.  Absent weights are pulled then, the model PULLING without lease share or load slot."""
        if runner.name in self._checking:
            return True
        if (
            self._busy(runner) or runner.state not in (S.STOPPED, S.FAILED) or self._closing
            or runner.name in self._weights_present or (runner.state is S.FAILED and self._in_backoff(runner))
            or not self.lifecycle.manages_weights(runner)
        ):
            return False
        self._checking.add(runner.name)
        self._spawn(runner, self._run_weights(runner))
        return True

    async def _run_weights(self, runner: ModelRunner) -> None:
        """Look at the model's cache; pull its weights when absent (PULLING), then let admission run."""
        try:
            needed = await self.lifecycle.check_weights(runner)
        except Exception as error:  # a look that crashed must not be retried at every pump
            log.error("weights_check_crashed", model=runner.name, error=repr(error), exc_info=error)
            needed = Failed(f"model {runner.name}: its weights could not be looked at: {error!r}", needs_operator=True,
                            code="weights_unavailable")
        finally:
            self._checking.discard(runner.name)
        if isinstance(needed, Failed):
            # Nothing was taken and nothing runs: the waiters are told, the model stays as it was.
            log.info("request_refused", reason=needed.code, model=runner.name)
            self._fail_waiters(runner, ModelUnavailable(
                needed.message, code=needed.code, extra={"log_lines": [], "needs_operator": needed.needs_operator},
            ))
            return
        if needed:
            if not self._move(runner, frozenset({S.STOPPED, S.FAILED}), S.PULLING, Requested()):
                return
            try:
                failed = await self.lifecycle.pull_weights(runner, self._progress(runner))
            except asyncio.CancelledError:
                self._move(runner, S.PULLING, S.STOPPED, Shutdown("its pull was called off"))
                raise
            if failed is not None:
                self._fail(runner, S.PULLING, failed)
                self._fail_waiters(runner, self._failure_error(runner))
                return
            self._move(runner, S.PULLING, S.STOPPED, WeightsPulled(runner.config.hf_model or runner.name))
            self._forget_if_gone(runner)
        self._weights_present.add(runner.name)

    def _held_by_quantum(self, names: list[str], priority: int) -> float | None:
        """When the swap quantum of a model among ``names`` (READY ones) may stop keeping a waiter of
        ``priority`` back: the time to decide again; None when none holds it (or the policy is fifo)."""
        if self.config.lifecycle.swap_policy != "quantum":
            return None
        now = time.monotonic()
        held = [
            until
            for runner in (self.runners[name] for name in names)
            if runner.state is S.READY
            and (until := protected_until(
                runner.quantum, now=now, in_flight=runner.in_flight, queued=self.queue.depth(runner.name),
                last_used=runner.last_used, challenger_priority=priority,
            )) is not None
        ]
        return min(held) if held else None

    def _pump_at(self, when: float) -> None:
        """Pump again at ``when`` (time.monotonic()), unless an earlier pump is due anyway."""
        timer = self._pump_timer
        if timer is not None and not timer.cancelled() and self._pump_timer_at <= when:
            return
        if timer is not None:
            timer.cancel()
        self._pump_timer_at = when
        self._pump_timer = asyncio.get_running_loop().call_later(max(0.0, when - time.monotonic()) + 0.01, self._timed_pump)

    def _timed_pump(self) -> None:
        self._pump_timer = None
        if not self._closing:
            self.pump()

    def quantum_of(self, runner: ModelRunner) -> float | None:
        """The swap quantum ``runner`` has, or would get now: max(min_uptime_s, swap_cost_factor x its
        last swap-in's cost, or its load ETA before one)."""
        lifecycle = self.config.lifecycle
        if lifecycle.swap_policy != "quantum":
            return None
        if runner.quantum is not None:
            return runner.quantum.length_s
        measured = runner.last_swap_s if runner.last_swap_s is not None else self.lifecycle.load_times.eta(runner.name)
        return quantum_length(lifecycle.min_uptime_s, lifecycle.swap_cost_factor, measured)

    def _call_off_swaps(self, victims: dict[str, Eviction]) -> None:
        """A model draining for a swap that is needed no more serves again."""
        for runner in list(self.runners.values()):
            if runner.state is not S.DRAINING or runner.name in victims or runner.name in self._operator_requests:
                continue
            if not self._busy(runner) and self._move(runner, S.DRAINING, S.READY, SwapCalledOff()):
                self._grant(runner)

    def _evict(self, victims: dict[str, Eviction], head: str) -> None:
        """Drain the models that make room for ``head``; stop or sleep each once its requests are done."""
        cause = SwapFor(head)
        for name, eviction in victims.items():
            runner = self.runners[name]
            if runner.state is S.READY:
                self._move(runner, S.READY, S.DRAINING, cause)
            if self._busy(runner):
                continue
            if runner.state is S.DRAINING and runner.in_flight == 0:
                if eviction.action == "sleep":
                    self._spawn(runner, self._run_sleep(runner, cause))
                else:
                    self._stop(runner, cause)
            elif runner.state is S.SLEEPING and eviction.action == "stop":
                self._stop(runner, cause)

    def _carry_out_operator_requests(self) -> None:
        for name, action in list(self._operator_requests.items()):
            runner = self.runners.get(name)
            if runner is None:
                continue
            cause = OperatorAction("sleep" if action == "sleep" else "stop")
            if runner.state is S.READY:
                self._move(runner, S.READY, S.DRAINING, cause)
            if runner.state is S.DRAINING and runner.in_flight == 0 and not self._busy(runner):
                if cause.action == "sleep":
                    self._spawn(runner, self._run_sleep(runner, cause))
                else:
                    self._stop(runner, cause)

    def _keep_utility_models(self) -> None:
        """Utility models run whenever no exclusive model holds or wants the GPU."""
        exclusive_wanted = any(
            self.runners[name].config.lifecycle == "exclusive" for name in [*self.lease.holders, *self.queue.models()]
        )
        if exclusive_wanted or self._closing:
            return
        for runner in self.runners.values():
            if runner.config.lifecycle != "utility" or self._busy(runner) or runner.name in self._operator_requests:
                continue
            if runner.config.gpu and self.gpu_missing:
                continue  # it would only fail; it still starts on its first request
            # A failed utility model is not retried on its own: its next request retries it.
            if runner.state is S.STOPPED and self.lease.fits(runner.load_claim):
                self._admit(runner, KeepUtility())

    def _restart_lost_models(self) -> None:
        """A model given up while it served (a wedged engine) starts again once it fits beside what
        runs; it evicts nothing, having no request of its own.  A request, an operator's stop or a
        reload that starts, stops or removes it first settles it."""
        for name, code in list(self._restarts.items()):
            runner = self.runners.get(name)
            if runner is None or self._restart_settled(runner, code):
                del self._restarts[name]

    def _restart_settled(self, runner: ModelRunner, code: str) -> bool:
        """Start the model again if it fits now; True once nothing is left to do (started, or
        called off: it moved on, an operator acts on it, sparkd is closing)."""
        if runner.state is not S.FAILED or runner.name in self._operator_requests or self._closing:
            return True
        return not self._busy(runner) and self.lease.fits(runner.load_claim) and self._admit(runner, RestartAfterLoss(code))

    def _admit(self, runner: ModelRunner, cause: Cause) -> bool:
        """Start (or wake) the model; the move takes its lease share at once.  False: another load
        holds the last load slot (``gpu.concurrent_loads``), the model waits for it to end."""
        if not self._load_slot_free():
            return False
        handing = self._handing
        runner.handed_at = handing[1] if handing is not None and handing[0] == runner.name else time.monotonic()
        if handing is not None and handing[0] == runner.name:
            self._handing = None
        if runner.state is S.SLEEPING:
            if self._move(runner, S.SLEEPING, S.WAKING, cause):
                self._spawn(runner, self._run_wake(runner, cause))
            return True
        if self._move(runner, frozenset({S.STOPPED, S.FAILED}), S.STARTING, cause):
            self._weights_present.discard(runner.name)  # the next start looks again
            runner.start_requested_at = runner.load_began
            runner.died.clear()
            runner.loss = None
            self._spawn(runner, self._run_start(runner, cause))
        return True

    def load_limit(self) -> int:
        """How many models may load (start or wake) at once; 0: any number.  On unified memory one:
        two loads race for the same pool, and vLLM's profiling counts the other's memory as its own."""
        configured = self.config.gpu.concurrent_loads
        if configured:
            return configured
        return 1 if self.unified_memory else 0

    def loading(self) -> list[ModelRunner]:
        return [r for r in self.runners.values() if r.state in (S.STARTING, S.WAKING)]

    def _load_slot_free(self) -> bool:
        limit = self.load_limit()
        return not limit or len(self.loading()) < limit

    async def last_words(self, runner: ModelRunner) -> list[str]:
        """Why a stream the engine broke off ended: sparkd's own reason when sparkd gave the model up
        (``model_lost``: its memory guard, its stall or readiness watch, a lost peer), else the
        engine's last log lines."""
        if runner.loss:
            return [runner.loss]
        return await self.lifecycle.tail_logs(runner)

    def _record_load(self, runner: ModelRunner, outcome: Started | Woke) -> None:
        """A start measured its container (a memory probe is in force): its load peak and its resident size."""
        if not isinstance(outcome, Started) or outcome.ready is None:
            return
        old = runner.footprint
        peak = outcome.peak if outcome.peak is not None else old.peak
        self._record_footprint(runner, replace(
            old, peak=peak, ready=outcome.ready, total=outcome.total or old.total, spec_hash=runner.spec.spec_hash,
        ))

    def _record_footprint(self, runner: ModelRunner, footprint: Footprint) -> None:
        """Keep what the model's container was measured to use; warn when it is above its claims."""
        runner.footprint = footprint
        self._emit(FootprintMeasured(
            runner.name, footprint.peak, footprint.ready, footprint.asleep, footprint.total, footprint.sleep_level, time.time(),
            footprint.spec_hash,
        ))
        self._check_claims(runner)

    def remember_footprint(self, name: str, footprint: Footprint) -> None:
        """A footprint measured before this sparkd started (the history): admission uses it from now on."""
        runner = self.runners.get(name)
        if runner is not None:
            runner.footprint = footprint
            _forget_stale_footprint(runner)
            self._check_claims(runner)

    def _check_claims(self, runner: ModelRunner) -> None:
        model, footprint = runner.config, runner.footprint
        checks = (
            (footprint.ready, model.gpu_memory, "resident once ready", "gpu_memory"),
            (footprint.asleep, model.sleep_gpu_memory, "resident asleep", "sleep_gpu_memory"),
        )
        warnings = []
        for value, configured, what, key in checks:
            measured = footprint.fraction(value)
            if measured > configured:
                warnings.append(claim_warning(runner.name, configured, measured, what, key, model.source))
                log.warning("model_claim_below_measured", model=runner.name, key=f"models.{runner.name}.{key}",
                            file=model.source, configured=configured, measured=round(measured, 4))
        runner.claim_warnings = tuple(warnings)

    def _grant(self, runner: ModelRunner) -> None:
        for waiter in self.queue.take(runner.name):
            if not waiter.future.done():
                runner.in_flight += 1
                waiter.future.set_result(None)

    def _fail_waiters(self, runner: ModelRunner, error: ApiError) -> None:
        for waiter in self.queue.take(runner.name):
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _holders(self) -> list[Holder]:
        holders = []
        for name, claim in self.lease.holders.items():
            runner = self.runners[name]
            settling = runner.state in (S.STARTING, S.WAKING)
            holders.append(
                Holder(
                    name=name,
                    claim=claim,
                    lifecycle=runner.config.lifecycle,
                    in_flight=runner.in_flight + (1 if settling else 0),
                    last_used=runner.last_used,
                    leaving=runner.state is S.STOPPING,
                    sleep_claim=runner.sleep_claim if runner.config.sleep_mode and runner.state is not S.SLEEPING else None,
                )
            )
        return holders

    def _busy(self, runner: ModelRunner) -> bool:
        return runner.task is not None and not runner.task.done()

    def _backoff_left(self, runner: ModelRunner) -> float:
        """Seconds until a failed model may be started again (the back-off doubles per failure, up to 12x)."""
        failure = runner.failure
        if failure is None:
            return 0.0
        backoff = self.config.lifecycle.failure_backoff_s * min(2.0 ** (runner.consecutive_failures - 1), 12.0)
        return max(0.0, backoff - (time.monotonic() - failure.at))

    def _in_backoff(self, runner: ModelRunner) -> bool:
        return self._backoff_left(runner) > 0

    def _failure_error(self, runner: ModelRunner) -> ApiError:
        failure = runner.failure
        message = failure.message if failure else f"model {runner.name} failed"
        lines = telling_lines(failure.log_lines, 5) if failure else []
        text = message + (". Last engine log lines: " + " | ".join(lines) if lines else "")
        if failure is not None and failure.needs_operator:
            return ModelUnavailable(text, code=failure.code, extra={"log_lines": lines, "needs_operator": True})
        retry = max(self._backoff_left(runner), 1.0)
        code = failure.code if failure is not None else "model_failed"
        return ServiceUnavailable(text, retry_after=retry, code=code, extra={"log_lines": lines})

    # -- tasks: the slow work, and what its outcome moves ---------------------------------

    def _spawn(self, runner: ModelRunner, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        runner.task = task
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._task_done(runner, done))

    def _task_done(self, runner: ModelRunner, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("scheduler_task_crashed", model=runner.name, state=runner.state.value, error=repr(error), exc_info=error)
            # Never leave a model stuck mid-transition: stop what may run, then fail it.
            if runner.state in LIVE and not self._closing:
                self._spawn(runner, self._run_lost(runner, f"model {runner.name}: internal error while {runner.state}: {error!r}"))
                return  # that task pumps when it ends
            if runner.state is S.PULLING and self._fail(runner, S.PULLING, Failed(
                f"model {runner.name}: internal error while pulling its weights: {error!r}", code="weights_pull_failed",
            )):
                self._fail_waiters(runner, self._failure_error(runner))
        if not self._closing:
            self.pump()

    async def _run_start(self, runner: ModelRunner, cause: Cause) -> None:
        no_weights = await self.lifecycle.ensure_weights(runner, self._progress(runner))
        if no_weights is not None:
            self._finish_load(runner, S.STARTING, cause, no_weights)
            return
        launched = await self.lifecycle.launch(runner)
        if isinstance(launched, Failed):
            self._finish_load(runner, S.STARTING, cause, launched)
            return
        # The container runs: its port and uptime show while its engine loads.
        runner.endpoint, runner.started_at, runner.stale_spec = launched.endpoint, launched.started_at, False
        ready = await self.lifecycle.await_ready(runner, self._progress(runner), launched)
        self._finish_load(runner, S.STARTING, cause, ready)

    async def _run_adopted(self, runner: ModelRunner, cause: Adopted) -> None:
        ready = await self.lifecycle.await_ready(runner, self._progress(runner), None)
        self._finish_load(runner, S.STARTING, cause, ready)

    async def _run_wake(self, runner: ModelRunner, cause: Cause) -> None:
        self._finish_load(runner, S.WAKING, cause, await self.lifecycle.wake(runner))

    def _finish_load(self, runner: ModelRunner, loading: ModelState, cause: Cause, outcome: Started | Woke | Failed) -> None:
        """A start or wake ended: READY and the waiters served, or FAILED and the waiters told why."""
        kind: Literal["start", "wake"] = "start" if loading is S.STARTING else "wake"
        began = runner.load_began
        if isinstance(outcome, Failed):
            if self._fail(runner, loading, outcome):
                self._emit(LoadFinished(runner.name, kind, began, time.time() - began, "failed", outcome.message))
            self._fail_waiters(runner, self._failure_error(runner))
            return
        self._record_load(runner, outcome)
        if self._move(runner, loading, S.READY, cause):
            self._emit(LoadFinished(runner.name, kind, began, outcome.took, "ready", cause.describe(S.READY)))
            self._begin_quantum(runner, outcome.took)
            self._grant(runner)

    def _begin_quantum(self, runner: ModelRunner, took: float) -> None:
        """A model that became ready for waiting requests gets its swap quantum (none without waiters),
        counted from the start of its swap, long enough for the swap it cost (``quantum.py``)."""
        now = time.monotonic()
        began = runner.handed_at if runner.handed_at is not None else now - took
        # A holder's long answer drained meanwhile is not a cost of the swap: at most a stop and a reclaim are.
        longest = took + self.config.lifecycle.stop_timeout_s + self.config.gpu.reclaim_timeout_s
        runner.handed_at, runner.last_swap_s = None, min(max(took, now - began), longest)
        began = now - runner.last_swap_s
        lifecycle = self.config.lifecycle
        if lifecycle.swap_policy != "quantum" or not self.queue.depth(runner.name):
            runner.quantum = None
            return
        length = quantum_length(lifecycle.min_uptime_s, lifecycle.swap_cost_factor, runner.last_swap_s)
        runner.quantum = Quantum(length, began + length, self.queue.priority(runner.name))
        log.info(
            "swap_quantum_began", model=runner.name, quantum_s=round(length, 3), swap_s=round(runner.last_swap_s, 3),
            left_s=round(began + length - now, 3), priority=runner.quantum.priority,
        )

    def _stop(self, runner: ModelRunner, cause: Cause) -> None:
        """Stop the model; STOPPING at once, so no request slips in before the task runs."""
        if self._move(runner, STOPPABLE, S.STOPPING, cause):
            self._spawn(runner, self._run_stop(runner, cause))

    async def _run_stop(self, runner: ModelRunner, cause: Cause) -> None:
        await self._stop_container(runner, cause, retry=True)
        self._operator_requests.pop(runner.name, None)
        self._forget_if_gone(runner)

    async def _stop_container(self, runner: ModelRunner, cause: Cause, *, retry: bool) -> None:
        """STOPPING -> STOPPED; a stop that failed is retried (``retry``) while the container may still
        run, since it holds its share until it is gone; otherwise the model is FAILED."""
        attempt = 0
        while True:
            outcome: Stopped | StopFailed = await self.lifecycle.stop(runner, cause.describe(S.STOPPED))
            if isinstance(outcome, Stopped):
                self._move(runner, S.STOPPING, S.STOPPED, cause)
                return
            if not (retry and outcome.container_running):
                self._fail(runner, S.STOPPING, Failed(outcome.message))
                return
            attempt += 1
            delay = min(STOP_RETRY_MAX_S, STOP_RETRY_FIRST_S * 2.0 ** (attempt - 1))
            log.warning("model_stop_failed", model=runner.name, error=outcome.message, attempt=attempt, retry_in_s=delay)
            await asyncio.sleep(delay)

    def _forget_if_gone(self, runner: ModelRunner) -> None:
        """Drop the runner of a model the configuration no longer enables, once it is stopped."""
        enabled = runner.name in self.config.models and self.config.models[runner.name].enabled
        if not enabled and runner.state is S.STOPPED and runner.name not in self.lease.holders:
            self.runners.pop(runner.name, None)
            self._operator_requests.pop(runner.name, None)

    async def _run_sleep(self, runner: ModelRunner, cause: Cause) -> None:
        self._operator_requests.pop(runner.name, None)
        outcome: Slept | Failed = await self.lifecycle.sleep(runner)
        if isinstance(outcome, Slept):
            if outcome.resident is not None:
                self._record_footprint(runner, replace(
                    runner.footprint, asleep=outcome.resident, sleep_level=outcome.level,
                    total=outcome.total or runner.footprint.total,
                ))
            self._move(runner, S.DRAINING, S.SLEEPING, cause)
            return
        stop_cause = SleepFailed(cause)
        if self._move(runner, S.DRAINING, S.STOPPING, stop_cause):
            await self._run_stop(runner, stop_cause)

    # -- container events --------------------------------------------------------------

    def on_container_event(self, event: ContainerEvent) -> None:
        runner = self.runners.get(event.model or "")
        if runner is None or event.action not in ("died", "oom"):
            return
        if event.time < runner.start_requested_at:
            return  # from before the current start: the previous stop's death, or replayed after a reconnect
        runner.died.set()
        if runner.state in (S.READY, S.DRAINING, S.SLEEPING) and not self._busy(runner):
            code = f" with code {event.exit_code}" if event.exit_code is not None else ""
            self._spawn(runner, self._run_lost(runner, f"model {runner.name}: its engine container exited{code} while serving"))

    # -- restart safety ------------------------------------------------------------------

    def start_serving(self) -> None:
        """Adoption is done: requests may start models from now on."""
        self._serving.set()
        self.pump()

    def adopt(self, runner: ModelRunner, adoption: Adoption) -> None:
        """Take over a container an earlier sparkd left running: READY when its engine answers,
        else STARTING until it does.  ``adopt_running`` made sure its share fits the budget."""
        cause = Adopted(container=adoption.container, started_at=adoption.started_at, loading=not adoption.serving)
        runner.endpoint, runner.started_at = adoption.endpoint, adoption.started_at
        runner.start_requested_at = adoption.started_at
        if adoption.serving:
            self._move(runner, S.STOPPED, S.READY, cause)
        elif self._move(runner, S.STOPPED, S.STARTING, cause):
            runner.load_began = adoption.started_at  # its load began with its container
            self._spawn(runner, self._run_adopted(runner, cause))

    def container_current(self, runner: ModelRunner) -> None:
        """The model's container was just (re-)created from its current spec (``sparkctl prepare``)."""
        runner.stale_spec = False

    # -- idle reaper ---------------------------------------------------------------------

    async def run_reaper(self) -> None:
        while True:
            await asyncio.sleep(REAPER_PERIOD_S)
            self.reap_idle()

    def reap_idle(self) -> None:
        now = time.monotonic()
        lifecycle = self.config.lifecycle
        for runner in list(self.runners.values()):
            if self._busy(runner) or runner.in_flight or runner.config.lifecycle in ("pinned", "utility"):
                continue
            idle_limit = runner.config.idle_stop_s or lifecycle.idle_stop_s
            if runner.state is S.READY:
                uptime = now - (runner.ready_at or now)
                if runner.idle_for(now) >= idle_limit and uptime >= lifecycle.min_uptime_s:
                    self._stop(runner, Idle(idle_limit))
            elif runner.state is S.SLEEPING and runner.idle_for(now) >= idle_limit:
                self._stop(runner, Idle(idle_limit, asleep=True))

    # -- operator actions ------------------------------------------------------------------

    async def start_model(self, name: str) -> ModelRunner:
        runner = await self.acquire(name)
        self.release(runner)
        return runner

    async def while_stopped(self, name: str, work: Callable[[ModelRunner], Coroutine[Any, Any, Any]]) -> Any:
        """Run ``work(runner)`` as the model's task if it is stopped or failed and idle (``sparkctl
        prepare``): no start of it overlaps, a request arriving meanwhile waits for it.
        Returns None without running it when the model is busy or its container may be running."""
        runner = self.runners[name]
        if self._busy(runner) or runner.state not in (S.STOPPED, S.FAILED) or self._closing:
            return None
        result: list[Any] = []

        async def run() -> None:
            result.append(await work(runner))

        self._spawn(runner, run())
        assert runner.task is not None
        await asyncio.shield(runner.task)
        return result[0] if result else None

    async def stop_model(self, name: str, timeout: float) -> ModelRunner:
        """Drain the model (in-flight requests finish), then stop it."""
        return await self._operator_request(name, "stop", {S.STOPPED, S.FAILED}, timeout)

    async def sleep_model(self, name: str, timeout: float) -> ModelRunner:
        """Drain the model, then put its engine to sleep (vLLM sleep mode)."""
        return await self._operator_request(name, "sleep", {S.SLEEPING, S.STOPPED, S.FAILED}, timeout)

    async def _operator_request(self, name: str, action: str, done: set[ModelState], timeout: float) -> ModelRunner:
        runner = self.runners[name]
        if runner.state in (S.READY, S.DRAINING, S.SLEEPING, S.FAILED, S.STARTING, S.WAKING):
            if action == "sleep" and runner.state is S.SLEEPING:
                return runner
            self._operator_requests[name] = action
            if runner.state in (S.SLEEPING, S.FAILED) and not self._busy(runner):
                self._stop(runner, OperatorAction("stop"))
            self.pump()
        await self.wait_for_state(runner, done, timeout)
        return runner

    async def wait_for_state(self, runner: ModelRunner, states: set[ModelState], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while runner.state not in states or self._busy(runner):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayTimeout(f"model {runner.name} is still {runner.state} after {timeout:.0f}s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    # -- reject policy and ETAs ----------------------------------------------------------

    def _refuse_if_busy(self, runner: ModelRunner) -> None:
        """Reject policy: refuse at once (429) when another model would have to go first."""
        if runner.state in (S.STARTING, S.WAKING, S.PULLING):
            return
        decision = plan(
            runner.name, runner.claim if runner.state is S.SLEEPING else runner.load_claim, runner.config.lifecycle, self.lease.holders.get(runner.name, 0.0),
            self._holders(), self.lease.budget,
        )
        if decision.verdict in ("evict", "wait"):
            busy = [e.name for e in decision.evictions] or [n for n in self.lease.holders if n != runner.name]
            raise busy_refusal(runner, self.runners[busy[0]], self.config.lifecycle.idle_stop_s)

    def retry_after(self, name: str) -> float:
        eta = self.lifecycle.load_times.eta(name)
        return eta if eta is not None else 30.0

    def _why_waiting(self, runner: ModelRunner) -> str:
        if runner.state in (S.STARTING, S.WAKING, S.PULLING):
            return f"it is still {runner.state}" + (f" ({runner.progress.describe()})" if runner.progress else "")
        loading = [r.name for r in self.loading()]
        if loading and not self._load_slot_free():
            return f"waiting for {', '.join(loading)} to finish loading (gpu.concurrent_loads = {self.load_limit()})"
        holders = [n for n in self.lease.holders if n != runner.name]
        return "the GPU is busy with " + ", ".join(holders) if holders else f"it is {runner.state}"


    # -- shutdown ------------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Refuse new work, fail queued requests, let in-flight ones finish (bounded by ``grace``)."""
        self._closing = True
        for name in self.queue.models():
            self._fail_waiters(self.runners[name], ServiceUnavailable("sparkd is shutting down; retry shortly", retry_after=5))
        deadline = time.monotonic() + grace
        while any(r.in_flight for r in self.runners.values()) and time.monotonic() < deadline:
            # A request's end emits no event: look again every 0.1 s, sooner on any news.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.1)

    async def stop_multi_node(self) -> None:
        """Stop the models that span nodes (``on_shutdown = "keep"`` cannot keep their worker leases)."""
        spanning = [r for r in self.runners.values() if r.config.spans and r.state is not S.STOPPED]
        await self._cancel_tasks([r.task for r in spanning if r.task is not None])
        await asyncio.gather(*(self._shutdown_stop(r, Shutdown("sparkd is stopping")) for r in spanning))

    async def stop_all(self) -> None:
        """Stop every model whose container may be running (``on_shutdown = "stop"``)."""
        await self._cancel_tasks(list(self._tasks))
        await asyncio.gather(
            *(self._shutdown_stop(r, Shutdown()) for r in self.runners.values() if r.state is not S.STOPPED)
        )

    async def _cancel_tasks(self, tasks: list[asyncio.Task[Any]]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown_stop(self, runner: ModelRunner, cause: Cause) -> None:
        """One attempt to stop the model; a stop cancelled half-way (STOPPING already) is finished."""
        if runner.state in (S.STOPPED, S.PULLING):
            return  # no container (a pull's task was cancelled, which ended it)
        if runner.state is S.STOPPING or self._move(runner, STOPPABLE, S.STOPPING, cause):
            await self._stop_container(runner, cause, retry=False)


def share_for(runner: ModelRunner, old: ModelState, state: ModelState, held: float | None) -> float | None:
    """The lease share a model holds in ``state`` (None: none), coming from ``old`` with the share it ``held``.

    A loading model holds its load claim (its measured load peak, if more than its claim);
    once ready, its claim (the larger of the configured and the measured resident size); a
    share granted then stays as it was while it serves, even if a reload changed the claim
    since; a sleeping model holds its sleep claim; a stopping one what it held until its
    container is gone; stopped and failed ones nothing (a failed model's container was
    stopped before it was failed); a pulling one nothing (a download needs no GPU).
    """
    if state in (S.STOPPED, S.FAILED, S.PULLING):
        return None
    if state is S.SLEEPING:
        return runner.sleep_claim
    if state in (S.STARTING, S.WAKING):
        return runner.load_claim
    if state is S.STOPPING:
        return held
    if old in (S.STARTING, S.WAKING) or held is None:
        return runner.claim  # ready after a load (or adopted at start-up, holding nothing yet)
    return held


def _forget_stale_footprint(runner: ModelRunner) -> None:
    """Figures measured on another container spec say nothing of the next container: until it is
    measured, the configured claims stand.  Called where no container of the old spec runs."""
    if runner.footprint.measured_on(runner.spec.spec_hash):
        return
    log.info("model_footprint_forgotten", model=runner.name, measured_on=runner.footprint.spec_hash,
             spec=runner.spec.spec_hash, reason="its container spec changed since it was measured")
    runner.footprint = Footprint()
    runner.claim_warnings = ()


def _enter(runner: ModelRunner, state: ModelState, cause: Cause, now: float) -> None:
    """The runner's fields that entering ``state`` sets or clears (``now``: wall-clock)."""
    monotonic = time.monotonic()
    if state is S.READY:
        runner.ready_at = monotonic
        runner.last_used = monotonic
        runner.progress = None
        runner.failure = None
        runner.consecutive_failures = 0
    elif state in (S.STARTING, S.WAKING):
        runner.progress = None
        runner.load_began = now
    elif state is S.PULLING:
        runner.progress = None
    elif state in (S.STOPPED, S.FAILED):
        _forget_stale_footprint(runner)  # its container, of an older spec, is gone
        runner.endpoint = None
        runner.started_at = None
        runner.ready_at = None
        runner.progress = None
    if state not in (S.READY, S.DRAINING):
        runner.quantum = None
    if state is S.FAILED and isinstance(cause, FailureCause):
        runner.failure = Failure(cause.message, cause.log_lines, monotonic, needs_operator=cause.needs_operator, code=cause.code)
        runner.consecutive_failures += 1


KILLED_AFTER = frozenset({"engine_wedged"})
"""Codes of ``model_lost`` whose container is killed rather than stopped: a wedged engine never
finishes a graceful shutdown, and its requests wait for the container to go."""
RESTARTED_AFTER = frozenset({"engine_wedged"})
"""Codes of ``model_lost`` after which the model is started again on its own: its engine loaded
and served, then wedged; a restart is what an operator would do.  A memory guard's stop is not
retried (the same load would trip it again)."""


def local_models(config: Config) -> list[ModelConfig]:
    """The enabled models this node may run itself: not those whose ``nodes`` name only other Sparks
    (requests for them are forwarded, ``sparkd/fleet``)."""
    return [m for m in config.enabled_models() if runs_here(m, config)]


def queue_limits(config: Config) -> QueueLimits:
    lifecycle = config.lifecycle
    return QueueLimits(size=lifecycle.queue_size, body_bytes=lifecycle.queue_body_bytes, per_key=lifecycle.queue_per_key)
