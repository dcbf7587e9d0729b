"""The echo wire format shared by the lab's servers and clients."""

import pytest

from refproxy.lab.echo import decode_reply, encode_reply, encode_request


@pytest.mark.parametrize(
    "seq,flow", [(0, ""), (7, "dns-fixed"), (123456789, "np")], ids=["zero", "tagged", "large"]
)
def test_round_trip(seq, flow):
    assert decode_reply(encode_reply("web-1", encode_request(seq, flow))) == ("web-1", seq)


def test_foreign_datagrams_are_not_replies():
    assert decode_reply(b"") is None
    assert decode_reply(b"only-one-word") is None
    assert decode_reply(b"id notanumber") is None


def test_negative_sequence_is_refused():
    with pytest.raises(ValueError):
        encode_request(-1)


def test_reply_is_bounded():
    assert len(encode_reply("x", b"9" * 5000)) <= 2048
