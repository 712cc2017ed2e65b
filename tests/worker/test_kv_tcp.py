"""The TCP KV connector between two connectors in this process: blocks arrive byte for byte (fp32, int8 with
its scales, fp8), into other block ids; a producer killed mid-way, a refused layout, an unknown or expired
transfer all end with the blocks released on the producer and the pull reported failed on the consumer."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from tests.server.serve_proc import free_port
from tokenmill.config import KVTransferConfig
from tokenmill.core.kv_transfer import KVRecv, KVSend
from tokenmill.ops.attention.kv_quant import allocate_quantized_kv_cache
from tokenmill.ops.attention.reference import allocate_kv_cache
from tokenmill.worker.kv_connector import KVBlockIO
from tokenmill.worker.kv_tcp import TcpKVConnector, recv_msg, send_msg

BS = 4
PROMPT = list(range(1, 23))  # 22 tokens: 6 blocks


def caches(kind: str, seed: int) -> list:
    if kind == "float32":
        kv = allocate_kv_cache(3, 40, BS, 2, 8, torch.float32, "cpu")
    else:
        kv = allocate_quantized_kv_cache(3, 40, BS, 2, 8, kind, "cpu")
    g = torch.Generator().manual_seed(seed)
    for p in KVBlockIO(kv, BS, kind).parts:  # random bytes everywhere (data and scales)
        p.copy_(torch.randint(0, 256, p.shape, generator=g, dtype=torch.uint8))
    return kv


def pair(kind="float32", timeout=5.0):
    port = free_port()
    prod = TcpKVConnector(KVTransferConfig(kv_role="producer", kv_transfer_port=port, kv_transfer_timeout=timeout),
                          KVBlockIO(caches(kind, 1), BS, kind))
    cons = TcpKVConnector(KVTransferConfig(kv_role="consumer", kv_transfer_timeout=timeout),
                          KVBlockIO(caches(kind, 2), BS, kind))
    return prod, cons, port


def wait_finished(conn, n_sent=0, n_recved=0, timeout=10.0):
    sent, recved = [], {}
    deadline = time.monotonic() + timeout
    while (len(sent) < n_sent or len(recved) < n_recved) and time.monotonic() < deadline:
        s, r = conn.get_finished(0.05)
        sent += s
        recved.update(r)
    return sent, recved


@pytest.mark.parametrize("kind", ["float32", "int8", "fp8"])
def test_blocks_arrive_byte_for_byte(kind):
    prod, cons, port = pair(kind)
    try:
        src = [5, 9, 2, 30, 31, 7]
        dst = [11, 12, 13, 14]  # blocks 2..5 of the producer's (0, 1 are local hits)
        prod.send_blocks("p", KVSend("T", src, PROMPT, 42))
        cons.recv_blocks("d", KVRecv("T", "127.0.0.1", port, dst, 2, PROMPT))
        assert wait_finished(cons, n_recved=1)[1] == {"d": True}
        assert wait_finished(prod, n_sent=1)[0] == ["p"]
        assert torch.equal(cons.io.gather(dst), prod.io.gather(src[2:]))
        assert not torch.equal(cons.io.gather([0, 1]), prod.io.gather(src[:2]))  # untouched
        assert cons.bytes_received == 4 * cons.io.row_bytes
    finally:
        prod.shutdown()
        cons.shutdown()


def test_empty_pull_releases_the_blocks():
    prod, cons, port = pair()
    try:
        prod.send_blocks("p", KVSend("T", [1, 2], PROMPT[:8], 42))
        cons.recv_blocks("d", KVRecv("T", "127.0.0.1", port, [], 2, PROMPT[:8]))
        assert wait_finished(cons, n_recved=1)[1] == {"d": True}
        assert wait_finished(prod, n_sent=1, timeout=1.0)[0] == ["p"]
    finally:
        prod.shutdown()
        cons.shutdown()


def test_many_blocks_in_chunks():
    prod, cons, port = pair()
    try:
        src, dst = list(range(1, 39)), list(range(39, 1, -1))[:38]
        prompt = list(range(38 * BS))
        prod.send_blocks("p", KVSend("T", src, prompt, 1))
        cons.recv_blocks("d", KVRecv("T", "127.0.0.1", port, dst, 0, prompt))
        assert wait_finished(cons, n_recved=1)[1] == {"d": True}
        for s, d in zip(src, dst):
            assert torch.equal(cons.io.gather([d]), prod.io.gather([s]))
    finally:
        prod.shutdown()
        cons.shutdown()


def test_refusals_fail_the_pull_and_release_the_blocks():
    prod, cons, port = pair(timeout=1.0)  # an unknown id is waited for that long (it may not be listed yet)
    try:
        cons.recv_blocks("x", KVRecv("nope", "127.0.0.1", port, [1], 0, PROMPT))  # unknown transfer id
        assert wait_finished(cons, n_recved=1)[1] == {"x": False}
        prod.send_blocks("p", KVSend("T", [1, 2, 3, 4, 5, 6], PROMPT, 42))
        cons.recv_blocks("d", KVRecv("T", "127.0.0.1", port, [1, 2], 0, PROMPT[:-1]))  # another prompt
        assert wait_finished(cons, n_recved=1)[1] == {"d": False}
        assert wait_finished(prod, n_sent=1)[0] == ["p"]  # one attempt per transfer: released
        other = TcpKVConnector(KVTransferConfig(kv_role="consumer"), KVBlockIO(caches("int8", 3), BS, "int8"))
        prod.send_blocks("q", KVSend("U", [1], PROMPT[:4], 42))
        other.recv_blocks("e", KVRecv("U", "127.0.0.1", port, [1], 0, PROMPT[:4]))  # int8 layout vs fp32
        assert wait_finished(other, n_recved=1)[1] == {"e": False}
        assert wait_finished(prod, n_sent=1)[0] == ["q"]
    finally:
        prod.shutdown()
        cons.shutdown()


def test_unpulled_blocks_expire():
    prod, cons, port = pair(timeout=0.3)
    try:
        prod.send_blocks("p", KVSend("T", [1, 2], PROMPT[:8], 42))
        t0 = time.monotonic()
        assert wait_finished(prod, n_sent=1)[0] == ["p"]
        assert 0.25 < time.monotonic() - t0 < 3.0
    finally:
        prod.shutdown()
        cons.shutdown()


def test_dead_producer_fails_fast():
    cons = TcpKVConnector(KVTransferConfig(kv_role="consumer"), KVBlockIO(caches("float32", 2), BS, "float32"))
    t0 = time.monotonic()
    cons.recv_blocks("d", KVRecv("T", "127.0.0.1", free_port(), [1], 0, PROMPT[:4]))  # nobody listens
    assert wait_finished(cons, n_recved=1)[1] == {"d": False}
    assert time.monotonic() - t0 < 2.0


def test_killed_mid_way_fails_the_pull():
    """A producer that sends the header and half the rows, then dies."""
    cons = TcpKVConnector(KVTransferConfig(kv_role="consumer"), KVBlockIO(caches("float32", 2), BS, "float32"))
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def fake():
        conn, _ = srv.accept()
        with conn:
            ask = recv_msg(conn, time.monotonic() + 5)
            send_msg(conn, {"ok": True, "token_ids": PROMPT, "first_token_id": 1, "num_blocks": ask["num_blocks"],
                            "chunk_blocks": 2})
            conn.sendall(b"\x01" * (cons.io.row_bytes * 3))  # 3 of 6 rows
        srv.close()

    t = threading.Thread(target=fake)
    t.start()
    cons.recv_blocks("d", KVRecv("T", "127.0.0.1", port, [1, 2, 3, 4, 5, 6], 0, PROMPT))
    assert wait_finished(cons, n_recved=1)[1] == {"d": False}
    t.join(5)
