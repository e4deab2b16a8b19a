"""A scriptable Modbus RTU/ASCII line for tests: the devices on an RS-485 line, seen from
the far end of a pseudo-terminal (or of a TCP connection, as a serial device server).

Unlike a library server it can stay silent for a unit (a powered-off device), emulate the
wire time of each reply at the line's baud rate, record when every request arrived and
when every reply ended (to prove that requests never overlap and keep the inter-frame
gap), and spoil chosen replies: a bad CRC, a garbage byte in front, a wrong byte count, a
reply from another unit, a late reply, and the echo a two-wire adapter produces.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from drivers.modbus.line import ascii_frame, char_time, crc16, lrc


@dataclass
class Request:
    """One request as the line saw it."""

    t_start: float
    unit: int
    fc: int
    address: int
    count: int
    t_reply_end: float | None = None
    """When the last byte of the reply was sent (None: nobody answered)."""
    busy: bool = False
    """It arrived while the line was still carrying the previous reply (an overlap)."""


@dataclass
class LinePeer:
    """Devices on one line. Start with :meth:`serve_pty` or :meth:`serve_tcp`.

    ``registers[unit]`` maps holding-register addresses to values; a unit absent from it
    never answers. ``faults[unit]`` lists faults for that unit's next replies, one each:
    ``crc``, ``garbage``, ``byte_count``, ``other_unit``, ``other_unit_first`` (a valid
    frame from another unit, then the reply), ``late:<seconds>``, ``bad_echo``, or ``""``
    (none). ``echo`` makes every reply start with the request (the master's own two-wire
    adapter). ``prefixes``, when given, are sent in turn before each reply (line noise:
    stray bytes before every frame).
    """

    baudrate: int = 9600
    framing: str = "rtu"
    registers: dict[int, dict[int, int]] = field(default_factory=dict)
    faults: dict[int, list[str]] = field(default_factory=dict)
    echo: bool = False
    prefixes: list[bytes] = field(default_factory=list)
    prefixed: int = 0
    """Stray bytes sent before replies so far."""
    turnaround: float = 0.002
    """Device think time before replying, seconds."""
    requests: list[Request] = field(default_factory=list)
    _fd: int = -1
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _sock: socket.socket | None = None
    port: int = 0
    _arrived: float | None = None

    # -- serving ---------------------------------------------------------------------------

    def serve_pty(self, path: str) -> None:
        """Serve on the far end of a pty pair (e.g. one made by socat)."""
        self._fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self._start()

    def serve_tcp(self) -> None:
        """Serve one TCP connection at a time on a free loopback port (:attr:`port`)."""
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        self._sock = srv
        self.port = srv.getsockname()[1]
        self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="line-peer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the port."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._sock is not None:
            self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock is not None:
                ready, _, _ = select.select([self._sock], [], [], 0.1)
                if not ready:
                    continue
                conn, _ = self._sock.accept()
                conn.setblocking(False)
                self._fd = conn.fileno()
                try:
                    self._serve()
                finally:
                    conn.close()
                    self._fd = -1
            else:
                self._serve()

    def _serve(self) -> None:
        buf = b""
        t_first = 0.0
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.05)
            if ready:
                try:
                    data = os.read(self._fd, 1024)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return
                if not data:
                    return
                if not buf:
                    t_first = self._arrived or time.monotonic()
                    self._arrived = None
                buf += data
            while True:
                frame, buf = self._take_request(buf)
                if frame is None:
                    break
                self._answer(frame, t_first)
                t_first = time.monotonic()

    # -- frames ----------------------------------------------------------------------------

    def _take_request(self, buf: bytes) -> tuple[bytes | None, bytes]:
        """One whole request (unit id + PDU, checks removed) off the front of ``buf``."""
        if self.framing == "ascii":
            end = buf.find(b"\n")
            if end < 0:
                return None, buf
            raw = bytes.fromhex(buf[1 : end - 1].decode())
            assert lrc(raw[:-1]) == raw[-1], f"bad LRC from the master: {buf!r}"
            return raw[:-1], buf[end + 1 :]
        if len(buf) < 8:
            return None, buf
        n = 8 if buf[1] in (1, 2, 3, 4, 5, 6) else 9 + buf[6]
        if len(buf) < n:
            return None, buf
        frame = buf[:n]
        assert crc16(frame[:-2]) == frame[-2:], f"bad CRC from the master: {frame.hex(' ')}"
        return frame[:-2], buf[n:]

    def _wire(self, adu: bytes) -> bytes:
        if self.framing == "ascii":
            return ascii_frame(adu)
        return adu + crc16(adu)

    def _answer(self, req: bytes, t_start: float) -> None:
        unit, fc = req[0], req[1]
        address, count = struct.unpack(">HH", req[2:6])
        prev = self.requests[-1] if self.requests else None
        rec = Request(t_start, unit, fc, address, count)
        if prev is not None and prev.t_reply_end is not None and t_start < prev.t_reply_end:
            rec.busy = True
        self.requests.append(rec)
        regs = self.registers.get(unit)
        if regs is None:
            return  # powered off
        fault = self.faults.get(unit, [])
        fault_now = fault.pop(0) if fault else ""
        if fc in (3, 4):
            try:
                words = [regs[a] for a in range(address, address + count)]
            except KeyError:
                adu = bytes([unit, fc | 0x80, 2])
            else:
                adu = bytes([unit, fc, 2 * count]) + struct.pack(f">{count}H", *words)
        elif fc == 6:
            regs[address] = count  # the value field
            adu = req
        else:
            adu = bytes([unit, fc | 0x80, 1])
        if fault_now == "byte_count":
            adu = adu[:2] + bytes([adu[2] + 2]) + adu[3:] + b"\0\0"
        if fault_now == "other_unit":
            adu = bytes([(unit % 247) + 1]) + adu[1:]
        wire = self._wire(adu)
        if fault_now == "crc":
            wire = wire[:-1] + bytes([wire[-1] ^ 0xFF])
        if fault_now == "garbage":
            wire = b"\x00" + wire
        if fault_now == "other_unit_first":
            other = bytes([(unit % 247) + 1]) + adu[1:3] + bytes(len(adu) - 3)
            wire = self._wire(other) + wire
        if self.prefixes:
            noise = self.prefixes[len(self.requests) % len(self.prefixes)]
            self.prefixed += len(noise)
            wire = noise + wire
        if self.echo:
            sent = self._wire(req)
            if fault_now == "bad_echo":
                sent = sent[:5] + bytes([sent[5] ^ 0x08]) + sent[6:]
            wire = sent + wire
        delay = self.turnaround
        if fault_now.startswith("late:"):
            delay = float(fault_now.split(":")[1])
        # the reply occupies the line for its wire time at the baud rate
        done = time.monotonic() + delay + len(wire) * char_time(self.baudrate)
        self._watch_until(done)
        os.write(self._fd, wire)
        rec.t_reply_end = time.monotonic()

    def _watch_until(self, t: float) -> None:
        """Sleep until ``t`` (the reply's wire time), noticing a request that arrives
        meanwhile: on a real line the two would collide."""
        while (left := t - time.monotonic()) > 0:
            ready, _, _ = select.select([self._fd], [], [], min(left, 0.001))
            if ready:
                if self._arrived is None:
                    self._arrived = time.monotonic()
                time.sleep(min(left, 0.001))


__all__ = ["LinePeer", "Request"]
