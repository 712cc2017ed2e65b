"""TcpKVConnector: KV blocks over plain TCP, pulled by the consumer (as NIXL reads the prefill side's memory).

Producer: a listening socket on kv_transfer_host:kv_transfer_port and one thread per connection. A served
transfer waits (its blocks held) until a consumer asks for it or kv_transfer_timeout passes; either way its
blocks are reported released once, after the last byte is written or the attempt failed: one attempt per
transfer, since the consumer recomputes when a pull fails.

Consumer: one thread per pull, each socket call bounded by what is left of kv_transfer_timeout; the rows
are written into the allocated blocks chunk by chunk as they arrive. Any error (refused, reset, short read,
a layout or prompt mismatch, the deadline, a cancel) reports the pull failed: the prompt is recomputed.

Wire format (all lengths big-endian u32):
  consumer -> producer  len + JSON {"transfer_id", "first_block", "num_blocks", "layout"}
  producer -> consumer  len + JSON {"ok": true, "token_ids", "first_token_id", "num_blocks", "chunk_blocks"}
                        (or {"ok": false, "error"}), then num_blocks rows of layout.row_bytes bytes, in chunks.
Sockets and threads only (no asyncio loop to run beside the engine's step loop); a dead peer is seen at once
as a refused or reset connection rather than after a timeout.
"""
from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch

from tokenmill.config import KVTransferConfig
from tokenmill.core.kv_transfer import KVRecv, KVSend
from tokenmill.errors import ConfigError
from tokenmill.worker.kv_connector import KVBlockIO, KVConnector

logger = logging.getLogger(__name__)

CHUNK_BLOCKS = 16  # blocks per gather / sendall (and per scatter on the consumer)
_MAX_HEADER = 64 << 20


class TransferError(RuntimeError):
    pass


def send_msg(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def recv_exact(sock: socket.socket, buf: memoryview, deadline: float) -> None:
    got = 0
    while got < len(buf):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferError("timed out")
        sock.settimeout(left)
        n = sock.recv_into(buf[got:])
        if n == 0:
            raise TransferError(f"connection closed after {got} of {len(buf)} bytes")
        got += n


def recv_msg(sock: socket.socket, deadline: float) -> dict:
    head = bytearray(4)
    recv_exact(sock, memoryview(head), deadline)
    (n,) = struct.unpack(">I", head)
    if n > _MAX_HEADER:
        raise TransferError(f"header of {n} bytes")
    body = bytearray(n)
    recv_exact(sock, memoryview(body), deadline)
    return json.loads(body)


@dataclass
class _Served:
    req_id: str
    send: KVSend
    deadline: float


class TcpKVConnector(KVConnector):
    def __init__(self, config: KVTransferConfig, io: KVBlockIO):
        self.config = config
        self.io = io
        self.timeout = config.kv_transfer_timeout
        self._cv = threading.Condition()
        self._sent: list[str] = []
        self._recved: dict[str, bool] = {}
        self._served: dict[str, _Served] = {}  # transfer id -> blocks waiting for their consumer
        self._over: dict[str, None] = {}  # transfer ids served or expired lately (oldest first), refused at once
        self._cancels: dict[str, threading.Event] = {}  # req id -> cancel flag of its pull
        self._stop = threading.Event()
        self._listener: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        # cumulative statistics
        self.bytes_sent = 0
        self.bytes_received = 0
        if config.is_producer:
            self._listen()

    # ---- producer ------------------------------------------------------------------------------
    def _listen(self) -> None:
        host, port = self.config.kv_transfer_host, self.config.kv_transfer_port
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            s.close()
            raise ConfigError(f"kv_transfer_port: cannot listen on {host}:{port}: {e.strerror or e}") from None
        s.listen(64)
        s.settimeout(0.2)
        self._listener = s
        self._thread = threading.Thread(target=self._accept_loop, name="tokenmill-kv-server", daemon=True)
        self._thread.start()
        logger.info("KV transfer server (producer) on %s:%d", host, port)

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.getsockname()[:2]

    def send_blocks(self, req_id: str, send: KVSend) -> None:
        with self._cv:
            if send.transfer_id in self._served:  # a second request with one transfer id: refuse to serve it
                logger.warning("duplicate KV transfer id %r: its blocks are not served", send.transfer_id)
                self._release(req_id)
                return
            self._served[send.transfer_id] = _Served(req_id, send, time.monotonic() + self.timeout)
            self._cv.notify_all()

    def _release(self, req_id: str) -> None:  # under self._cv
        self._sent.append(req_id)
        self._cv.notify_all()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            self._expire()
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), name="tokenmill-kv-send", daemon=True).start()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._cv:
            for tid in [t for t, s in self._served.items() if s.deadline <= now]:
                served = self._served.pop(tid)
                self._over_add(tid)
                logger.warning("KV transfer %r not pulled within %.1f s: its blocks are freed", tid, self.timeout)
                self._release(served.req_id)

    def _claim(self, transfer_id: str, deadline: float) -> Optional[_Served]:
        """The transfer's blocks, waiting for them while the engine has not yet listed them (the HTTP answer of
        the prefill can reach the consumer before the next step hands the blocks over); None if it is over."""
        with self._cv:
            while transfer_id not in self._served:
                left = deadline - time.monotonic()
                if transfer_id in self._over or left <= 0 or self._stop.is_set():
                    return None
                self._cv.wait(min(left, 0.5))
            self._over_add(transfer_id)
            return self._served.pop(transfer_id)

    def _over_add(self, transfer_id: str) -> None:  # under self._cv
        self._over[transfer_id] = None
        if len(self._over) > 4096:
            del self._over[next(iter(self._over))]

    def _serve(self, conn: socket.socket) -> None:
        served: Optional[_Served] = None
        try:
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                deadline = time.monotonic() + self.timeout
                ask = recv_msg(conn, deadline)
                served = self._claim(str(ask.get("transfer_id")), deadline)
                if served is None:
                    send_msg(conn, {"ok": False, "error": "unknown or expired transfer id"})
                    return
                blocks = served.send.block_ids
                first, num = int(ask.get("first_block", -1)), int(ask.get("num_blocks", -1))
                if ask.get("layout") != self.io.layout:
                    send_msg(conn, {"ok": False, "error": f"KV layout {ask.get('layout')} != the producer's "
                                                          f"{self.io.layout}"})
                    return
                if first < 0 or num < 0 or first + num > len(blocks):
                    send_msg(conn, {"ok": False, "error": f"blocks {first}..{first + num} out of {len(blocks)}"})
                    return
                send_msg(conn, {"ok": True, "token_ids": served.send.token_ids,
                                "first_token_id": served.send.first_token_id, "num_blocks": num,
                                "chunk_blocks": CHUNK_BLOCKS})
                conn.settimeout(self.timeout)
                for i in range(first, first + num, CHUNK_BLOCKS):
                    rows = self.io.gather(blocks[i:min(i + CHUNK_BLOCKS, first + num)])
                    conn.sendall(memoryview(rows.numpy()).cast("B"))
                    self.bytes_sent += rows.numel()
        except Exception as e:  # the blocks are released all the same (finally)
            logger.warning("KV transfer (send) failed: %s: %s", type(e).__name__, e)
        finally:
            if served is not None:
                with self._cv:
                    self._release(served.req_id)

    # ---- consumer ------------------------------------------------------------------------------
    def recv_blocks(self, req_id: str, recv: KVRecv) -> None:
        ev = threading.Event()
        with self._cv:
            self._cancels[req_id] = ev
        threading.Thread(target=self._pull, args=(req_id, recv, ev), name="tokenmill-kv-recv", daemon=True).start()

    def cancel(self, req_id: str) -> None:
        with self._cv:
            ev = self._cancels.get(req_id)
        if ev is not None:
            ev.set()

    def _pull(self, req_id: str, recv: KVRecv, cancel: threading.Event) -> None:
        ok = False
        try:
            ok = self._pull_blocks(recv, cancel)
        except Exception as e:  # whatever went wrong, the request goes on by recompute
            logger.warning("KV transfer %r from %s:%d failed (the prompt is recomputed): %s: %s", recv.transfer_id,
                           recv.host, recv.port, type(e).__name__, e)
        finally:
            with self._cv:
                self._cancels.pop(req_id, None)
                self._recved[req_id] = ok
                self._cv.notify_all()

    def _pull_blocks(self, recv: KVRecv, cancel: threading.Event) -> bool:
        deadline = time.monotonic() + self.timeout
        num = len(recv.block_ids)
        row = self.io.row_bytes
        with socket.create_connection((recv.host, recv.port), timeout=self.timeout) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send_msg(s, {"transfer_id": recv.transfer_id, "first_block": recv.first_block, "num_blocks": num,
                         "layout": self.io.layout})
            head = recv_msg(s, deadline)
            if not head.get("ok"):
                raise TransferError(f"the producer refused: {head.get('error')}")
            if head.get("token_ids") != recv.token_ids:
                raise TransferError("the producer's prompt tokens differ from this request's")
            chunk = int(head.get("chunk_blocks", CHUNK_BLOCKS))
            buf = torch.empty((max(1, min(chunk, num)), row), dtype=torch.uint8)
            view = memoryview(buf.numpy()).cast("B")
            for i in range(0, num, chunk):
                if cancel.is_set():
                    raise TransferError("cancelled")
                ids = recv.block_ids[i:i + chunk]
                recv_exact(s, view[:len(ids) * row], deadline)
                self.io.scatter(ids, buf[:len(ids)])
                self.bytes_received += len(ids) * row
        return True

    # ---- both ----------------------------------------------------------------------------------
    def get_finished(self, wait_s: float = 0.0) -> tuple[list[str], dict[str, bool]]:
        with self._cv:
            if wait_s > 0 and not (self._sent or self._recved):
                self._cv.wait(wait_s)
            sent, recved = self._sent, self._recved
            self._sent, self._recved = [], {}
        return sent, recved

    def shutdown(self) -> None:
        self._stop.set()
        for ev in list(self._cancels.values()):
            ev.set()
        if self._listener is not None:
            self._listener.close()
        if self._thread is not None:
            self._thread.join(2.0)
