import pytest

from shardchat import phoenix
from shardchat.exceptions import ProtocolError
from shardchat.phoenix import Action, ChannelTable, Message


def test_codec_v2_round_trip():
    message = Message("1", "2", "chats:abc", "teacher:send", {"message": "hi ü"})
    assert phoenix.decode_v2(phoenix.encode_v2(message)) == message


def test_codec_v2_wire_shape():
    text = phoenix.encode_v2(Message(None, "5", "phoenix", "phx_reply", {}))
    assert text == '[null,"5","phoenix","phx_reply",{}]'


def test_codec_v1_round_trip():
    message = Message("1", "2", "presence:teachers", "phx_join", {})
    assert phoenix.decode_v1(phoenix.encode_v1(message)) == message


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("not json", "invalid JSON frame"),
        ("{}", "invalid frame: expected [join_ref, ref, topic, event, payload]"),
        ('[1, "2", "t", "e", {}]', "invalid join_ref 1: expected string or null"),
        ('[null, 2, "t", "e", {}]', "invalid ref 2: expected string or null"),
        ('[null, "2", "", "e", {}]', "invalid topic '': expected a non-empty string"),
        (
            '[null, "2", "t", null, {}]',
            "invalid event None: expected a non-empty string",
        ),
        (
            '[null, "2", "t", "e"]',
            "invalid frame: expected [join_ref, ref, topic, event, payload]",
        ),
    ],
)
def test_codec_v2_invalid(text, error):
    with pytest.raises(ProtocolError) as info:
        phoenix.decode_v2(text)
    assert str(info.value).startswith(error)


def test_codec_v1_rejects_array():
    with pytest.raises(ProtocolError, match="invalid frame: expected a JSON object"):
        phoenix.decode_v1("[]")


def test_reply_shape():
    request = Message("1", "7", "presence:teachers", "claim:student", {})
    reply = phoenix.error_reply(request, "no students waiting")
    assert reply == Message(
        "1",
        "7",
        "presence:teachers",
        "phx_reply",
        {"status": "error", "response": {"reason": "no students waiting"}},
    )


def test_close_shape():
    assert phoenix.close("chats:1", "3") == Message(
        "3", "3", "chats:1", "phx_close", {}
    )


def test_channels_heartbeat():
    table = ChannelTable()
    assert (
        table.classify(Message(None, "1", "phoenix", "heartbeat", {}))
        is Action.HEARTBEAT
    )


def test_channels_event_on_unjoined_topic():
    table = ChannelTable()
    assert (
        table.classify(Message("1", "2", "chats:x", "teacher:send", {}))
        is Action.UNMATCHED
    )


def test_channels_leave_unjoined_topic():
    table = ChannelTable()
    assert (
        table.classify(Message("1", "2", "chats:x", "phx_leave", {}))
        is Action.LEAVE_UNJOINED
    )


def test_channels_joined_event_and_stale_join_ref():
    table = ChannelTable()
    table.accept_join("chats:x", "4")
    assert (
        table.classify(Message("4", "5", "chats:x", "teacher:send", {})) is Action.EVENT
    )
    assert (
        table.classify(Message("3", "6", "chats:x", "teacher:send", {})) is Action.STALE
    )
    assert (
        table.classify(Message(None, "7", "chats:x", "teacher:send", {}))
        is Action.EVENT
    )
    assert table.classify(Message("4", "8", "chats:x", "phx_leave", {})) is Action.LEAVE


def test_channels_rejoin_reports_previous_join_ref():
    table = ChannelTable()
    table.accept_join("chats:x", "4")
    assert table.classify(Message("9", "9", "chats:x", "phx_join", {})) is Action.JOIN
    assert table.previous_join_ref("chats:x") == "4"
    assert table.previous_join_ref("chats:y") is phoenix.UNJOINED


def test_channels_too_many():
    table = ChannelTable()
    for index in range(phoenix.MAX_CHANNELS):
        table.accept_join(f"chats:{index}", str(index))
    extra = Message("x", "x", "chats:extra", "phx_join", {})
    assert table.classify(extra) is Action.TOO_MANY
    rejoin = Message("y", "y", "chats:0", "phx_join", {})
    assert table.classify(rejoin) is Action.JOIN
