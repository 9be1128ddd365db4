"""The shadow worker: a child process that sends the copies and compares.

A copy costs about as much CPU as the request it copies (a second upstream
call, a capture and a comparison). Done in the gateway's own event loop, that
CPU is taken from the next client requests. So each gateway process starts
one child (``python -m strangler.shadowproc``) and hands it the copies: the
gateway only pickles a tuple and appends it to a pipe, in batches of up to
`BATCH_DELAY` (fewer wake-ups of the worker, which shares the CPUs with the
gateway, means less scheduling delay for the gateway's own requests).

The pipe carries length-prefixed pickles, both ways:

* gateway → worker: ``("config", RouteFile)`` at start and on every reload,
  then ``("jobs", [Job.as_tuple(), ...])``, the copies of one batch;
* worker → gateway, every `REPORT_INTERVAL`: ``("stats", delta, samples,
  counts, pending)``: the comparison counts (`ShadowStats.take_delta`), the
  metric counts, and the worker's queue length. The gateway adds them to its
  own `ShadowStats` (which writes them to Redis when configured) and metrics.

Bounded: when the pipe holds more than `MAX_PIPE_BYTES` the copy is dropped
and counted; the worker has the usual concurrency limit and queue. A worker
that dies is logged and started again (at most once a second); copies meant
for it in between are dropped and counted. The worker exits when the pipe
closes, so it never outlives the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import struct
import sys
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from strangler import metrics, shadow, tasks
from strangler.config import RouteFile
from strangler.shadow import Job, Shadower, ShadowPolicy
from strangler.upstream import Pool

__all__ = ["ShadowProcess"]

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
#: Bytes waiting in the pipe to the worker beyond which copies are dropped.
MAX_PIPE_BYTES = 16 * 1024 * 1024
REPORT_INTERVAL = 0.2
#: Copies wait this long to go to the worker together, or until there are BATCH_JOBS.
BATCH_DELAY = 0.005
BATCH_JOBS = 256
RESPAWN_DELAY = 1.0
MAX_FRAME = 64 * 1024 * 1024
#: The worker's ``nice`` increment.
NICENESS = 10


def _frame(message: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    try:
        head = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(head)
        if size > MAX_FRAME:
            raise ValueError(f"frame of {size} bytes")
        message: tuple[Any, ...] = pickle.loads(await reader.readexactly(size))
        return message
    except asyncio.IncompleteReadError:
        return None


# --------------------------------------------------------------------------- gateway side


class ShadowProcess:
    """The gateway's handle on its shadow worker."""

    def __init__(self, shadower: Shadower) -> None:
        self.shadower = shadower
        self.config: RouteFile | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: list[bytes] = []
        self._jobs: list[tuple[Any, ...]] = []
        #: The timer that sends the batch being gathered.
        self._batch: asyncio.TimerHandle | None = None
        self._stopping = False
        self._next_start = 0.0
        self._starting = False

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, cfg: RouteFile) -> None:
        self.config = cfg
        self._stopping = False
        await self._spawn()

    async def _spawn(self) -> None:
        env = {**os.environ}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the worker reports through the pipe
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "strangler.shadowproc",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        self._reader = tasks.spawn(self._read(self._proc), name="shadow-worker-reader")
        if self.config is not None:
            self._send(("config", self.config))

    def configure(self, cfg: RouteFile) -> None:
        """A reload: the worker builds its policies and pools from the new file."""
        self.config = cfg
        if self.alive:
            self._send(("config", cfg))

    def submit(self, job: Job) -> None:
        """Hand a copy to the worker (on the request path: cheap, never blocks)."""
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            shadow.count("requests", job.route, "dropped")
            self._restart_soon()
            return
        transport = proc.stdin.transport
        if transport.get_write_buffer_size() > MAX_PIPE_BYTES:
            shadow.count("requests", job.route, "dropped")
            return
        self._jobs.append(job.as_tuple())
        if len(self._jobs) >= BATCH_JOBS:
            self._flush()
        elif self._batch is None:
            self._batch = asyncio.get_running_loop().call_later(BATCH_DELAY, self._flush)

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._jobs:  # keep the order: jobs queued before this message go first
            self._pending.append(_frame(("jobs", self._jobs)))
            self._jobs = []
        self._pending.append(_frame(message))
        self._flush()

    def _flush(self) -> None:
        """One pickle and one write for all the copies of a batch (and any message)."""
        if self._batch is not None:
            self._batch.cancel()  # harmless when it is the timer calling
            self._batch = None
        if self._jobs:
            self._pending.append(_frame(("jobs", self._jobs)))
            self._jobs = []
        pending, self._pending = self._pending, []
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return
        proc.stdin.write(b"".join(pending))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                message = await _read_frame(proc.stdout)
                if message is None:
                    break
                if message[0] == "stats":
                    _, delta, samples, counts, pending = message
                    self.shadower.stats.absorb(delta, samples)
                    for (kind, route, label), n in counts.items():
                        shadow.count(kind, route, label, n)
                    metrics.SHADOW_QUEUE.set(pending)
        except (ValueError, pickle.UnpicklingError, OSError) as exc:
            logger.error("shadow worker sent garbage (%s); restarting it", exc)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        if not self._stopping:
            logger.error(
                "shadow worker exited (code %s); copies are dropped until it is back",
                proc.returncode,
            )
            self._restart_soon()

    def _restart_soon(self) -> None:
        if self._stopping or self._starting or time.monotonic() < self._next_start:
            return
        self._starting = True
        self._next_start = time.monotonic() + RESPAWN_DELAY

        async def restart() -> None:
            try:
                await asyncio.sleep(RESPAWN_DELAY)
                if not self._stopping and not self.alive:
                    await self._spawn()
                    logger.info("shadow worker started again")
            finally:
                self._starting = False

        tasks.spawn(restart(), name="shadow-worker-restart")

    async def stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            self._flush()
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


# --------------------------------------------------------------------------- worker side


class _Worker:
    """The child: the routes' shadow policies and pools, and a `Shadower`."""

    def __init__(self) -> None:
        self.policies: dict[str, ShadowPolicy] = {}
        self.pools: dict[str, Pool] = {}
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.shadower = Shadower(resolve=self.resolve)
        shadow.set_sink(self._count)

    def _count(self, kind: str, route: str, label: str, n: int = 1) -> None:
        self.counts[(kind, route, label)] += n

    def resolve(self, route: str) -> tuple[ShadowPolicy, Mapping[str, Pool]] | None:
        policy = self.policies.get(route)
        return None if policy is None else (policy, self.pools)

    async def configure(self, cfg: RouteFile) -> None:
        from strangler.runtime import default_pool_factory

        self.policies = {r.name: ShadowPolicy(r.name, r.shadow) for r in cfg.routes if r.shadow}
        needed = {p.backend for p in self.policies.values()}
        for r in cfg.routes:
            if r.shadow:
                needed.update(b.name for b in r.backends)
                if r.fallback:
                    needed.add(r.fallback)
        pools: dict[str, Pool] = {}
        for name in needed:
            candidate = default_pool_factory(name, cfg)
            existing = self.pools.get(name)
            if existing is not None and existing.same_settings(candidate):
                pools[name] = existing
            else:
                await candidate.start()
                pools[name] = candidate
        for name, pool in self.pools.items():
            if pools.get(name) is not pool:
                pool.retire()
        self.pools = pools
        self.shadower.configure(cfg.server.shadow_concurrency, cfg.server.shadow_queue)

    def report(self) -> bytes | None:
        delta, samples = self.shadower.stats.take_delta()
        counts, self.counts = self.counts, Counter()
        if not delta and not samples and not counts:
            return None
        pending = len(self.shadower.pending)
        return _frame(("stats", delta, samples, dict(counts), pending))


async def _worker_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_FRAME)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    worker = _Worker()

    async def report_forever() -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            frame = worker.report()
            if frame is not None:
                writer.write(frame)
                await writer.drain()

    reporter = tasks.spawn(report_forever(), name="shadow-report")
    try:
        while True:
            message = await _read_frame(reader)
            if message is None:
                break  # the gateway is gone
            kind = message[0]
            if kind == "jobs":
                for job in message[1]:
                    worker.shadower.submit(Job.from_tuple(job))
            elif kind == "config":
                await worker.configure(message[1])
    finally:
        reporter.cancel()
        frame = worker.report()
        if frame is not None:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(frame)
                await writer.drain()
        await tasks.cancel_all()
        await asyncio.gather(*(p.close() for p in worker.pools.values()), return_exceptions=True)


def main() -> None:
    # Lower priority than the gateway: when CPU is short, the client requests go
    # first, and the copies wait (and, past the queue, are dropped and counted).
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"
    )
    try:
        import uvloop

        uvloop.run(_worker_main())
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_worker_main())
    except KeyboardInterrupt:  # pragma: no cover
        pass


if __name__ == "__main__":
    main()
