"""The proxy port's transport joins one loop turn's writes into one send."""

from __future__ import annotations

import asyncio
from typing import Any

from strangler.server import _CoalescingTransport


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000)}.get(name, default)


async def test_head_and_body_written_in_one_turn_go_out_as_one_write() -> None:
    raw = RecordingTransport()
    wire = _CoalescingTransport(raw)
    wire.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    wire.write(b"ok")
    assert raw.writes == []  # nothing sent before the turn ends
    await asyncio.sleep(0)
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    wire.write(b"next")
    await asyncio.sleep(0)
    assert raw.writes[-1] == b"next"
    assert len(raw.writes) == 2


async def test_close_flushes_pending_writes_first_and_later_writes_are_dropped() -> None:
    raw = RecordingTransport()
    wire = _CoalescingTransport(raw)
    wire.write(b"last bytes")
    wire.close()
    assert raw.writes == [b"last bytes"]
    assert raw.closed
    wire.write(b"too late")
    await asyncio.sleep(0)
    assert raw.writes == [b"last bytes"]


async def test_everything_else_is_delegated() -> None:
    raw = RecordingTransport()
    wire = _CoalescingTransport(raw)
    assert wire.get_extra_info("peername") == ("127.0.0.1", 5000)
    assert wire.is_closing() is False
