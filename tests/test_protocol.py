"""The wire format: round trips, and malformed messages rejected with a clear error and no state change."""
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from src.link import protocol
from src.link.codec import CODECS, NotFinite, get_codec
from src.pipeline import build_pipeline
from src.link.protocol import HEADER_SIZE, Kind
from src.utils import ProtocolError, TriadicError

HIDDEN = 32


def hidden_message(codec="none", count=3, start=5, step=2):
    states = torch.randn(count, HIDDEN, generator=torch.Generator().manual_seed(count)) * 10  # same bytes every call
    return states, protocol.encode_hidden(step, start, states, get_codec(codec))


@pytest.mark.parametrize("codec", list(CODECS))
def test_round_trip_keeps_header_fields_and_values(codec):
    states, raw = hidden_message(codec)
    message = protocol.decode(raw, HIDDEN)
    assert (message.kind, message.step, message.start, message.count) == (Kind.HIDDEN, 2, 5, 3)
    assert message.codec_id == get_codec(codec).codec_id
    tolerance = {"none": 0.0, "fp16": 1e-2, "bf16": 1e-1}.get(codec, 0.5)
    assert torch.allclose(message.hidden.float(), states, atol=tolerance, rtol=0.01)


def test_start_and_token_round_trip():
    start = protocol.decode(protocol.encode_start(123456789012, 3, 0xDEADBEEF, HIDDEN), HIDDEN)
    assert (start.kind, start.seed, start.resplit_every, start.fingerprint) == (Kind.START, 123456789012, 3, 0xDEADBEEF)
    token = protocol.decode(protocol.encode_token(7, 40, 49151, HIDDEN), HIDDEN)
    assert (token.kind, token.step, token.start, token.token) == (Kind.TOKEN, 7, 40, 49151)


def reseal(raw: bytes) -> bytes:
    """Recompute the CRC so that only the field we changed is wrong."""
    import zlib

    header = raw[: HEADER_SIZE - 4] + b"\0\0\0\0"
    crc = zlib.crc32(raw[HEADER_SIZE:], zlib.crc32(header))
    return raw[: HEADER_SIZE - 4] + struct.pack("<I", crc) + raw[HEADER_SIZE:]


def patch(raw: bytes, offset: int, fmt: str, value) -> bytes:
    data = bytearray(raw)
    struct.pack_into(fmt, data, offset, value)
    return reseal(bytes(data))


def test_malformed_messages_are_rejected_with_a_reason():
    _, raw = hidden_message()
    cases = {
        "truncated message": raw[:10],
        "checksum mismatch": raw[:-1],
        "bad magic": patch(raw, 0, "<2s", b"XX"),
        "protocol version": patch(raw, 2, "<B", 9),
        "unknown message kind": patch(raw, 3, "<B", 77),
        "unknown codec id": patch(raw, 4, "<B", 200),
        "unknown dtype code": patch(raw, 5, "<B", 9),
        "hidden size": patch(raw, 6, "<H", HIDDEN + 1),
        "wrong payload length": patch(raw, 16, "<I", 4),
    }
    corrupted = bytearray(raw)
    corrupted[HEADER_SIZE + 3] ^= 0xFF
    cases["checksum"] = bytes(corrupted)
    for reason, bad in cases.items():
        with pytest.raises(ProtocolError, match=reason):
            protocol.decode(bad, HIDDEN)


def test_non_finite_values_are_rejected():
    """A receiver refuses them; a sender never encodes them, whatever the codec (it sees them on its host copy)."""
    states = torch.randn(2, HIDDEN)
    states[1, 3] = float("nan")
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        protocol.decode(protocol.encode_hidden(0, 0, states, get_codec("none"), finite=False), HIDDEN)
    for name in ("none", "fp16", "bf16", "int8-fixed", "int8"):
        with pytest.raises(NotFinite, match=f"codec {name}: the states to send hold Inf or NaN"):
            protocol.encode_hidden(0, 0, states, get_codec(name))
    states[1, 3] = float("inf")
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        protocol.decode(protocol.encode_hidden(0, 0, states, get_codec("bf16"), finite=False), HIDDEN)
    states[:, :12] = float("-inf")  # more than the int8 codecs' outliers: Inf in the rotated rest too
    for name in ("int8-fixed", "int8"):
        with pytest.raises(NotFinite):
            protocol.encode_hidden(0, 0, states, get_codec(name))


def test_unknown_codec_name_is_a_user_error():
    with pytest.raises(TriadicError, match="unknown codec 'zip'"):
        get_codec("zip")


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_protocol_error(data):
    try:
        protocol.decode(data, HIDDEN)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_bit_flips_in_valid_messages_are_caught(data):
    _, raw = hidden_message(data.draw(st.sampled_from(list(CODECS))))
    position = data.draw(st.integers(0, len(raw) - 1))
    flipped = bytearray(raw)
    flipped[position] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(ProtocolError):
        protocol.decode(bytes(flipped), HIDDEN)


def cloud_snapshot(cloud):
    keys = [(layer.keys.clone() if layer.is_initialized else None) for layer in cloud.cache.layers]
    store = {j: (s, t.clone()) for j, (s, t) in cloud.store.held().items()}
    return keys, list(cloud.fill), list(cloud.peer_fill), store, cloud.last_step, cloud.end


def assert_same_state(before, after):
    keys0, *rest0 = before
    keys1, *rest1 = after
    assert [k is None for k in keys0] == [k is None for k in keys1]
    assert all(torch.equal(x, y) for x, y in zip(keys0, keys1) if x is not None)
    fill0, peer0, store0, step0, end0 = rest0
    fill1, peer1, store1, step1, end1 = rest1
    assert (fill0, peer0, step0, end0) == (fill1, peer1, step1, end1)
    assert store0.keys() == store1.keys() and all(torch.equal(store0[j][1], store1[j][1]) for j in store0)


class RecordingLink:
    def __init__(self, cloud):
        self.cloud, self.requests = cloud, []

    def request(self, data):
        self.requests.append(data)
        return self.cloud.handle(data)


def test_cloud_rejects_bad_requests_and_keeps_its_caches(tiny_tied):
    folder, _ = tiny_tied
    pipeline = build_pipeline(str(folder), {1}, {3}, with_tokenizer=False)
    link = RecordingLink(pipeline.cloud)
    pipeline.edge.link = link
    prompt = [1, 5, 9, 33, 17]
    pipeline.edge.generate(prompt, 3)
    cloud = pipeline.cloud
    good_next = link.requests[-1]  # step 2's request: replaying it is out of order
    before = cloud_snapshot(cloud)
    states = torch.randn(1, 32)
    nan_states = states.clone()
    nan_states[0, 0] = float("nan")
    bad_requests = {
        "does not follow step": good_next,
        "positions start at": protocol.encode_hidden(3, 2, torch.randn(6, 32), get_codec("none")),
        "expected 7": protocol.encode_hidden(3, 7, torch.randn(2, 32), get_codec("none")),
        "NaN or Inf": protocol.encode_hidden(3, 7, nan_states, get_codec("none"), finite=False),
        "truncated": good_next[:20],
        "wrong payload length": patch(protocol.encode_hidden(3, 7, states, get_codec("none")), 16, "<I", 2),
        "unknown dtype code": patch(protocol.encode_hidden(3, 7, states, get_codec("none")), 5, "<B", 7),
        "hidden size": protocol.encode_hidden(3, 7, torch.randn(1, 16), get_codec("none")),
        "accepts START, TURN and HIDDEN": protocol.encode_token(3, 7, 5, 32),
    }
    for reason, request in bad_requests.items():
        with pytest.raises(ProtocolError, match=reason):
            cloud.handle(request)
        assert_same_state(before, cloud_snapshot(cloud))
    # The session is intact: the next valid step is accepted.
    reply = protocol.decode(cloud.handle(protocol.encode_hidden(3, 7, states, get_codec("none"))), 32)
    assert (reply.step, reply.start, reply.count) == (3, 7, 1)


def test_cloud_refuses_a_session_with_other_split_sets(tiny_tied):
    folder, _ = tiny_tied
    pipeline = build_pipeline(str(folder), {1}, {3}, with_tokenizer=False)
    other = build_pipeline(str(folder), {1}, {2}, with_tokenizer=False)
    other.edge.link = pipeline.edge.link
    with pytest.raises(ProtocolError, match="fingerprint"):
        other.edge.generate([1, 5, 9], 2)
    with pytest.raises(ProtocolError, match="no session"):
        build_pipeline(str(folder), {1}, {3}, with_tokenizer=False).cloud.handle(protocol.encode_hidden(0, 0, torch.randn(3, 32), get_codec("none")))


def test_start_carries_the_sampling_options_and_stays_readable_without_them(tiny_tied):
    from src.sampling import SamplingConfig

    options = SamplingConfig(do_sample=True, temperature=0.7, top_k=0, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=2**64 - 1).resolved()
    start = protocol.decode(protocol.encode_start(5, 1, 77, HIDDEN, options), HIDDEN)
    assert (start.seed, start.fingerprint, start.sampling) == (5, 77, options)
    plain = protocol.decode(protocol.encode_start(5, 1, 77, HIDDEN), HIDDEN)  # a START as before: greedy
    assert plain.sampling == SamplingConfig().resolved() and not plain.sampling.do_sample
    bad = bytearray(protocol.encode_start(5, 1, 77, HIDDEN, options))
    struct.pack_into("<d", bad, HEADER_SIZE + 16 + 8 + 8, 0.0)  # top_p = 0
    with pytest.raises(ProtocolError, match="bad sampling options: --top-p 0.0"):
        protocol.decode(reseal(bytes(bad)), HIDDEN)
    # the two-part cloud chooses the token but never sees the prompt: it refuses a repetition penalty
    folder, _ = tiny_tied
    pipeline = build_pipeline(str(folder), {1}, {4}, two_part=True, with_tokenizer=False)
    fingerprint = pipeline.schedule.fingerprint()
    with pytest.raises(ProtocolError, match="cannot apply a repetition penalty"):
        pipeline.cloud.handle(protocol.encode_start(0, 1, fingerprint, HIDDEN, options))
    assert not pipeline.cloud.session


@pytest.mark.parametrize("two_part", [False, True])
def test_an_fp16_cloud_refuses_states_past_its_range_before_its_state_changes(tiny_tied, two_part):
    """States finite in the float32 they were sent in but past fp16's 65504: refused on arrival, nothing changed, the
    session goes on. States that overflow inside the layers give a one-line refusal too, also where the two-part cloud
    would have sampled from NaN logits (torch's RuntimeError, a traceback on the server)."""
    from src.pipeline import SideOptions
    from src.sampling import SamplingConfig

    folder, _ = tiny_tied
    fp16 = SideOptions(dtype=torch.float16)
    pipeline = build_pipeline(str(folder), {1}, {4} if two_part else {3}, two_part=two_part, with_tokenizer=False, cloud_side=fp16, edge_side=fp16)
    cloud = pipeline.cloud
    cloud.handle(protocol.encode_start(0, 1, pipeline.schedule.fingerprint(), HIDDEN, SamplingConfig(do_sample=True, seed=1).resolved()))
    before = cloud_snapshot(cloud)
    with pytest.raises(ProtocolError, match="do not fit the cloud's float16: values past its range"):
        cloud.handle(protocol.encode_hidden(0, 0, torch.full((4, HIDDEN), 1e5), get_codec("none")))
    assert_same_state(before, cloud_snapshot(cloud))
    reply = protocol.decode(cloud.handle(protocol.encode_hidden(0, 0, torch.randn(4, HIDDEN), get_codec("none"))), HIDDEN)
    assert (reply.step, reply.kind) == (0, Kind.TOKEN if two_part else Kind.HIDDEN)
    with torch.no_grad():  # layers whose MLP overflows fp16 on ordinary states
        for name, parameter in cloud.part.named_parameters():
            if "down_proj" in name:
                parameter.mul_(1e5)
    with pytest.raises(ProtocolError, match="drive the model to Inf or NaN"):
        cloud.handle(protocol.encode_hidden(1, 4, torch.randn(1, HIDDEN), get_codec("none")))


def test_a_side_reads_received_states_on_its_device_only_where_their_bound_does_not_fit(tiny_tied, monkeypatch):
    """On a GPU the range check's read is a wait in every step: it runs only where the decoded peak (known on the
    host) does not show that the states fit this side's dtype after unweighing. In fp16: 60,000 fits, 65,000 does not
    (a percent to spare), nor does 700 divided by a gain of 0.01, nor no bound at all."""
    from src.pipeline import SideOptions

    folder, _ = tiny_tied
    pipeline = build_pipeline(str(folder), {1}, {3}, with_tokenizer=False, cloud_side=SideOptions(dtype=torch.float16))
    cloud, int8 = pipeline.cloud, get_codec("int8")
    reads = []
    real_isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: reads.append(x.shape) or real_isfinite(x))
    states = torch.randn(2, HIDDEN)
    for peak, read in ((60_000.0, False), (65_000.0, True), (float("inf"), True)):
        reads.clear()
        assert torch.equal(cloud.received(1, states, int8, peak), states.half())
        assert bool(reads) is read, peak
    cloud.least_gains[1] = 0.01  # a family that weighs its link (Gemma 3): the receiver divides by the gain
    for codec, read in ((int8, True), (get_codec("none"), False)):  # only channel-weighted codecs are unweighed
        reads.clear()
        cloud.received(1, states, codec, 700.0)
        assert bool(reads) is read, codec.name
    monkeypatch.undo()
    message = protocol.decode(protocol.encode_hidden(0, 0, states, int8), HIDDEN)
    assert 0 < message.peak < 2.02 * float(states.norm(dim=-1).max())  # what a message carries: well inside fp16


def test_an_fp16_edge_refuses_cloud_states_past_its_range(tiny_tied):
    from src.pipeline import SideOptions

    folder, _ = tiny_tied
    pipeline = build_pipeline(str(folder), {1}, {3}, with_tokenizer=False, edge_side=SideOptions(dtype=torch.float16))
    cloud = pipeline.cloud

    def inflating(data: bytes) -> bytes:  # a cloud whose states come back 1e6 times larger, still finite in float32
        raw = cloud.handle(data)
        reply = protocol.decode(raw, HIDDEN)
        if reply.kind is not Kind.HIDDEN:
            return raw
        return protocol.encode_hidden(reply.step, reply.start, reply.hidden * 1e6, get_codec("none"))

    pipeline.edge.link.request = inflating
    with pytest.raises(ProtocolError, match="the cloud's states do not fit the edge's float16"):
        pipeline.edge.generate([1, 5, 9], 2)
