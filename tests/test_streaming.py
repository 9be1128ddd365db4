"""Large bodies stream through the gateway in bounded memory.

A 200 MB upload and a 200 MB download pass through a real gateway process
while a thread samples the gateway's resident set size (``VmRSS`` in
``/proc/<pid>/status``); it may grow by less than 50 MB. A client that goes
away mid-download makes the gateway stop reading from the backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import httpx
import pytest
from gateway import GatewayProcess, route_file
from threaded_server import ThreadedServer

from legacy_stub.data import download_pattern

pytestmark = pytest.mark.timeout(180)

MB = 1024 * 1024
BIG = 200 * MB
MAX_RSS_GROWTH = 50 * MB
TIMEOUT = httpx.Timeout(30.0)


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's RSS every few milliseconds while the block runs."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = rss(pid)
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            self.samples += 1
            self._stop.wait(self.interval)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss(self.pid))


class EndlessBackend(ThreadedServer):
    """Streams a chunked body that never ends; records when the reader goes away."""

    CHUNK = b"z" * 65536

    def __init__(self) -> None:
        super().__init__()
        self.bytes_sent = 0
        self.started = threading.Event()
        self.closed = threading.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"%x\r\n%s\r\n" % (len(self.CHUNK), self.CHUNK)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            self.started.set()
            while not self._stop_requested():
                writer.write(chunk)
                await writer.drain()
                self.bytes_sent += len(self.CHUNK)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            writer.close()

    def _stop_requested(self) -> bool:
        return self._stop is not None and self._stop.is_set()


@pytest.fixture(scope="module")
def endless() -> Iterator[EndlessBackend]:
    backend = EndlessBackend().start()
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, monolith: str, endless: EndlessBackend
) -> Iterator[GatewayProcess]:
    cfg = route_file(
        {"legacy": monolith, "endless": endless.url},
        [
            {
                "name": "endless",
                "match": {"path_prefix": "/endless"},
                "backends": [{"name": "endless", "weight": 1}],
            },
            {
                "name": "legacy",
                "match": {"path_prefix": "/api"},
                "backends": [{"name": "legacy", "weight": 1}],
            },
        ],
        limits={"max_body_bytes": 256 * MB},
    )
    proc = GatewayProcess(tmp_path_factory.mktemp("streaming-gateway"), cfg).start()
    # Warm up both directions so one-off allocations are not counted as growth.
    with httpx.Client(base_url=proc.url, timeout=TIMEOUT) as client:
        for _ in range(2):
            client.post("/api/upload", content=iter([b"w" * MB] * 8)).raise_for_status()
            with client.stream("GET", "/api/download", params={"size": 8 * MB}) as resp:
                for _chunk in resp.iter_raw():
                    pass
    yield proc
    proc.stop(timeout=10)


def gateway_pid(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    return gw.proc.pid


def download_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in download_pattern(size):
        digest.update(chunk)
    return digest.hexdigest()


def test_large_upload_streams_in_bounded_memory(gw: GatewayProcess) -> None:
    digest = hashlib.sha256()
    block = bytes(range(256)) * 1024  # 256 KiB

    def body() -> Iterator[bytes]:
        for i in range(BIG // len(block)):
            chunk = block[i % 256 :] + block[: i % 256]
            digest.update(chunk)
            yield chunk

    with RssSampler(gateway_pid(gw)) as sampler, httpx.Client(timeout=TIMEOUT) as client:
        resp = client.post(gw.url + "/api/upload", content=body())
    assert resp.status_code == 200, resp.text
    report = resp.json()
    assert (report["bytes"], report["sha256"]) == (BIG, digest.hexdigest())
    assert sampler.samples > 10
    assert sampler.growth < MAX_RSS_GROWTH, f"RSS grew by {sampler.growth / MB:.1f} MB"


def test_large_download_streams_in_bounded_memory(gw: GatewayProcess) -> None:
    digest = hashlib.sha256()
    received = 0
    with RssSampler(gateway_pid(gw)) as sampler, httpx.Client(timeout=TIMEOUT) as client:
        with client.stream("GET", gw.url + "/api/download", params={"size": BIG}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-length"] == str(BIG)
            for chunk in resp.iter_raw():
                digest.update(chunk)
                received += len(chunk)
    assert received == BIG
    assert digest.hexdigest() == download_sha256(BIG)
    assert sampler.samples > 10
    assert sampler.growth < MAX_RSS_GROWTH, f"RSS grew by {sampler.growth / MB:.1f} MB"


def test_client_leaving_mid_download_leaves_the_gateway_healthy(gw: GatewayProcess) -> None:
    with RssSampler(gateway_pid(gw)) as sampler, httpx.Client(timeout=TIMEOUT) as client:
        for _ in range(3):
            got = 0
            with client.stream("GET", gw.url + "/api/download", params={"size": BIG}) as resp:
                assert resp.status_code == 200
                for chunk in resp.iter_raw():
                    got += len(chunk)
                    if got >= 4 * MB:
                        break
        time.sleep(0.5)  # let the gateway notice and clean up while we sample
    assert sampler.growth < MAX_RSS_GROWTH, f"RSS grew by {sampler.growth / MB:.1f} MB"
    health = httpx.get(gw.url + "/__strangler/healthz", timeout=5)
    assert health.json() == {"status": "ok"}
    with httpx.Client(timeout=TIMEOUT) as client:
        resp = client.get(gw.url + "/api/download", params={"size": 3 * MB + 7})
    assert resp.status_code == 200
    assert hashlib.sha256(resp.content).hexdigest() == download_sha256(3 * MB + 7)


def test_client_leaving_mid_download_stops_the_upstream_read(
    gw: GatewayProcess, endless: EndlessBackend
) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        with client.stream("GET", gw.url + "/endless/stream") as resp:
            assert resp.status_code == 200
            got = 0
            for chunk in resp.iter_raw():
                got += len(chunk)
                if got >= 4 * MB:
                    break
        assert endless.started.is_set()
        left_at = time.monotonic()
        # The backend would stream forever; the gateway must hang up on it.
        assert endless.closed.wait(5), f"gateway kept reading ({endless.bytes_sent} bytes)"
        assert time.monotonic() - left_at < 5
        sent_when_closed = endless.bytes_sent
        time.sleep(0.3)
        assert endless.bytes_sent == sent_when_closed
        assert client.get(gw.url + "/__strangler/healthz").status_code == 200
