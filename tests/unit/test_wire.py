"""Authenticated framing (archer_async.wire.Signer): round trip, and every tampered part is refused."""

import os

import pytest

from archer_async import wire


def _signer():
    return wire.Signer(os.urandom(wire.SECRET_BYTES))


def test_round_trip_with_zmq_like_buffers():
    s = _signer()
    payload = os.urandom(229_224)
    frames = s.pack(wire.PROTO_REQ, {"op": "put", "rid": 7}, payload)
    assert len(frames) == 4 and len(frames[3]) == wire.MAC_BYTES
    header, got = s.unpack(wire.PROTO_REQ, [memoryview(bytes(f)) for f in frames])
    assert header == {"op": "put", "rid": 7}
    assert bytes(got) == payload


def test_nonces_differ_between_messages_of_equal_content():
    s = _signer()
    a = s.pack(wire.PROTO_REQ, {"op": "ping", "rid": 1})[3]
    b = s.pack(wire.PROTO_REQ, {"op": "ping", "rid": 1})[3]
    assert a[:wire.NONCE_BYTES] != b[:wire.NONCE_BYTES] and a != b


@pytest.mark.parametrize("part", ["proto", "header", "payload", "nonce", "tag", "direction", "key"])
def test_any_tampered_part_is_refused(part):
    s = _signer()
    frames = s.pack(wire.PROTO_REQ, {"op": "put", "rid": 1}, b"\x00" * 1000)
    proto, check = wire.PROTO_REQ, s
    if part == "proto":
        frames[0] = b"AAB2x"
    elif part == "header":
        frames[1] = wire._HEADER_ENCODER.encode({"op": "put", "rid": 2})
    elif part == "payload":
        frames[2] = b"\x00" * 999 + b"\x01"
    elif part == "nonce":
        frames[3] = bytes([frames[3][0] ^ 1]) + frames[3][1:]
    elif part == "tag":
        frames[3] = frames[3][:-1] + bytes([frames[3][-1] ^ 1])
    elif part == "direction":  # a request can never be taken for a reply
        proto = wire.PROTO_REP
    else:
        check = _signer()
    with pytest.raises(wire.AuthError):
        check.unpack(proto, frames)


def test_wrong_frame_count_and_mac_length_are_auth_errors():
    s = _signer()
    frames = s.pack(wire.PROTO_REQ, {"op": "ping", "rid": 1})
    with pytest.raises(wire.AuthError):
        s.unpack(wire.PROTO_REQ, frames[:3])
    with pytest.raises(wire.AuthError):
        s.unpack(wire.PROTO_REQ, frames[:3] + [frames[3][:-1]])


def test_authentic_frame_with_garbage_header_is_a_frame_error():
    s = _signer()
    nonce = os.urandom(wire.NONCE_BYTES)
    hb = b"\xc1"  # never valid msgpack
    mac = nonce + wire._tag(s._aead, nonce, wire.PROTO_REQ, hb, b"")
    with pytest.raises(wire.FrameError) as e:
        s.unpack(wire.PROTO_REQ, [wire.PROTO_REQ, hb, b"", mac])
    assert not isinstance(e.value, wire.AuthError)


def test_replay_window_takes_each_message_once():
    w = wire.ReplayWindow()
    assert w.fresh("s", 1) and w.fresh("s", 2) and not w.fresh("s", 2) and not w.fresh("s", 1)
    assert w.fresh("s", 10) and w.fresh("s", 5)  # late but within the window, once
    assert not w.fresh("s", 5)
    assert w.fresh("s", 10 + wire.ReplayWindow.WINDOW)
    assert not w.fresh("s", 10)  # out of the window: refused, never served twice
    assert w.fresh("t", 1)  # sessions are independent
    assert not w.fresh("", 1) and not w.fresh("u", 0)  # no freshness: refused
