"""The engine process's loop (engine/core_proc.py) sends the outputs it knows without a step (the producer's first
token of a transferred request) in the same message as the stats of the requests it just added."""
from __future__ import annotations

import pickle

import zmq

from tokenmill.engine.core_proc import _EngineLoop


class _Inbox:
    def __init__(self, msgs):
        self.msgs = [pickle.dumps(m) for m in msgs]

    def recv(self, flags=0):
        if not self.msgs:
            raise zmq.Again()
        return self.msgs.pop(0)


class _Req:
    def __init__(self, rid):
        self.request_id = rid

    def __eq__(self, other):
        return isinstance(other, _Req) and other.request_id == self.request_id


class _Core:
    def __init__(self):
        self.added, self.ready = [], []

    def add_request(self, req):
        self.added.append(req)
        self.ready.append(("first token of", req.request_id))

    def abort_requests(self, ids, status=None):
        pass

    def take_ready_outputs(self):
        out, self.ready = self.ready, []
        return out

    def stats(self):
        return "stats"


def _loop(core, msgs):
    loop = _EngineLoop.__new__(_EngineLoop)  # no sockets: the inbox and the sent list stand in for them
    loop.zmq, loop.core, loop.inp, loop.stopping = zmq, core, _Inbox(msgs), False
    loop.sent = []
    loop.send = loop.sent.append
    return loop


def test_first_tokens_go_out_with_the_add_not_after_a_step():
    core = _Core()
    loop = _loop(core, [("add", "r1", [_Req("a")]), ("add", "r2", [_Req("b")])])
    loop._drain()
    assert loop.sent == [("added", "r1", None), ("added", "r2", None),
                         ("out", [("first token of", "a"), ("first token of", "b")], "stats")]


def test_nothing_queued_sends_nothing():
    loop = _loop(_Core(), [])
    loop._drain()
    assert loop.sent == []
