"""Sessions: a conversation keeps both sides' KV caches; each turn runs only its new positions and equals
HF generate on the whole conversation so far. An edited history cuts both sides back to the common prefix."""
from __future__ import annotations

import pytest

from src.pipeline import RemoteCloud, build_pipeline
from src.sampling import SamplingConfig, model_generation_defaults
from tiny import hf_greedy, hf_sample

NEW = 8
TURNS = [[1, 5, 9, 33, 17, 80, 3, 41], [7, 7, 60, 2, 11], [1, 90, 44]]  # what the "user" adds each turn
FIXED, MOVING, TWO = ({1}, {3}), ({0, 1}, {2, 3, 4}), ({1, 2}, {4})


def reference(model, ids: list[int], sampling: SamplingConfig | None) -> list[int]:
    if sampling is None:
        return hf_greedy(model, ids, NEW)[0]
    return hf_sample(model, ids, NEW, sampling.seed, temperature=sampling.temperature, top_p=sampling.top_p)


def converse(chat, model, turns, sampling=None, edit=None):
    """Run the turns; each turn's request is the conversation so far. Returns (request, result) per turn."""
    conversation, history = [], []
    for k, user in enumerate(turns):
        if edit is not None and k == len(turns) - 1:
            conversation = edit(conversation)
        conversation = conversation + user
        result = chat.generate(conversation, NEW, sampling=sampling)
        assert result.token_ids == reference(model, conversation, sampling), k
        history.append((conversation, result))
        conversation = conversation + result.token_ids
    return history


def sampled(folder, seed=4) -> SamplingConfig:
    return SamplingConfig(do_sample=True, temperature=0.8, top_p=0.9, seed=seed).resolved(model_generation_defaults(folder))


@pytest.mark.parametrize("sample", [False, True])
def test_three_turns_run_only_their_new_positions(tiny_tied, sample):
    folder, model = tiny_tied
    L = model.config.num_hidden_layers
    pipeline = build_pipeline(str(folder), *FIXED, "none", with_tokenizer=False)
    with pipeline.edge.session() as chat:
        history = converse(chat, model, TURNS, sampled(folder) if sample else None)
        cloud_end = pipeline.cloud.end
    assert pipeline.cloud.end == 0 and not pipeline.cloud.session  # the session's end frees the local cloud's caches at once
    processed = 0  # positions in the caches after each turn: all but the last generated token
    for k, (request, result) in enumerate(history):
        assert result.cached_positions == processed, k  # turn k reused every cached position
        new_positions = len(request) - processed + len(result.token_ids) - 1
        a, b = 1, 3
        assert result.layer_evals == {"edge": (a + L - b) * new_positions, "cloud": (b - a) * new_positions}, k
        processed = len(request) + len(result.token_ids) - 1
    assert cloud_end == processed  # the cloud kept its caches across the turns too


def test_moving_cuts_and_two_part_sessions(tiny_untied):
    folder, model = tiny_untied
    for sets, two_part in ((MOVING, False), (TWO, True)):
        pipeline = build_pipeline(str(folder), *sets, "none", seed=2, two_part=two_part, with_tokenizer=False)
        with pipeline.edge.session() as chat:
            history = converse(chat, model, TURNS, sampled(folder, seed=9))
        for request, result in history[1:]:
            assert result.cached_positions > 0
            # each side's layers run at most once per position they own: no position of earlier turns is redone
            assert sum(result.layer_evals.values()) <= 2 * model.config.num_hidden_layers * (len(request) + NEW - result.cached_positions)


@pytest.mark.parametrize("sets", [FIXED, MOVING])
def test_an_edited_history_truncates_to_the_common_prefix(tiny_tied, sets):
    folder, model = tiny_tied
    pipeline = build_pipeline(str(folder), *sets, "none", seed=1, with_tokenizer=False)

    def edit(conversation):  # change one token of the second user turn
        changed = list(conversation)
        changed[len(TURNS[0]) + NEW + 2] = 50
        return changed

    with pipeline.edge.session() as chat:
        history = converse(chat, model, TURNS, edit=edit)
        request, result = history[-1]
        assert result.cached_positions == len(TURNS[0]) + NEW + 2  # the common prefix, not 0
        # the same request again: everything but its last position is reused
        again = chat.generate(request, NEW)
        assert again.token_ids == result.token_ids and again.cached_positions == len(request) - 1
        # a shorter request (a prefix of the cache)
        shorter = request[:5]
        assert chat.generate(shorter, NEW).token_ids == hf_greedy(model, shorter, NEW)[0]
    assert pipeline.edge.end == 0  # leaving the block forgets the conversation


def test_a_cloud_refuses_an_inconsistent_turn(tiny_tied):
    from src.link import protocol
    from src.utils import ProtocolError

    folder, _ = tiny_tied
    pipeline = build_pipeline(str(folder), *FIXED, "none", with_tokenizer=False)
    pipeline.edge.generate(TURNS[0], NEW)
    cloud, edge = pipeline.cloud, pipeline.edge
    state = (list(cloud.fill), cloud.end, cloud.last_step)
    hidden = edge.hidden_size
    greedy = SamplingConfig().resolved()
    for message, reason in [
        (protocol.encode_turn(NEW, 3, 2, edge.end + 1, greedy, hidden), "mirror says"),
        (protocol.encode_turn(NEW - 1, 3, 2, edge.end, greedy, hidden), "does not follow step"),
        (protocol.encode_turn(NEW, edge.end + 1, 2, edge.end, greedy, hidden), "cannot keep"),
    ]:
        with pytest.raises(ProtocolError, match=reason):
            cloud.handle(message)
        assert (list(cloud.fill), cloud.end, cloud.last_step) == state
    turn = protocol.decode(protocol.encode_turn(NEW, 3, 2, edge.end, sampled(folder), hidden), hidden)
    assert (turn.kind, turn.step, turn.start, turn.count, turn.edge_end) == (protocol.Kind.TURN, NEW, 3, 2, edge.end)
    assert turn.sampling == sampled(folder)


@pytest.fixture(scope="module")
def servers(tiny_tied, tmp_path_factory):
    """A three-part cloud with moving cuts and a two-part cloud, as subprocesses."""
    from tests.test_grpc import Server, running

    folder, _ = tiny_tied
    tmp = tmp_path_factory.mktemp("session_grpc")
    started = {"three": Server(folder, tmp / "three.log", ((0, 1), (2, 3, 4))), "two": Server(folder, tmp / "two.log", ((1, 2), (4,)), "--two-part")}
    with running(started.values()):
        yield started


def test_sessions_over_grpc_keep_one_stream(servers, tiny_tied):
    """Three turns (and an edit) over gRPC equal HF generate; each conversation is one cloud session, on one stream (the
    second keeps 7 of the first's 39 positions: it starts a session of its own, `REPLAY_BOUND`)."""
    from src.link.grpc_link import GrpcLink

    folder, model = tiny_tied
    for name, sets, two_part, sampling in (("three", MOVING, False, None), ("two", TWO, True, sampled(folder, seed=3))):
        url = servers[name].url
        with GrpcLink(url, timeout=30) as probe:
            before = probe.stats()["sessions_total"]
        pipeline = build_pipeline(str(folder), *sets, "none", seed=5, two_part=two_part, remote=RemoteCloud(url), with_tokenizer=False)
        local = build_pipeline(str(folder), *sets, "none", seed=5, two_part=two_part, with_tokenizer=False)
        with pipeline.edge.session() as chat, local.edge.session() as local_chat:
            remote_turns = converse(chat, model, TURNS, sampling) + converse(chat, model, TURNS, sampling, edit=lambda c: c[:-3])
            local_turns = converse(local_chat, model, TURNS, sampling) + converse(local_chat, model, TURNS, sampling, edit=lambda c: c[:-3])
            assert pipeline.edge.link.stats()["sessions"] == 1
        for (_, remote), (_, here) in zip(remote_turns, local_turns):  # the same work per turn as in one process
            assert (remote.cached_positions, remote.layer_evals, remote.bytes_up) == (here.cached_positions, here.layer_evals, here.bytes_up)
        assert [r.cached_positions for _, r in remote_turns][1:3] == [len(TURNS[0]) + NEW - 1, len(TURNS[0]) + len(TURNS[1]) + 2 * NEW - 1]
        with GrpcLink(url, timeout=30) as probe:
            assert probe.stats()["sessions_total"] == before + 2, name
        pipeline.edge.link.close()


def test_sampling_over_grpc_two_part(servers, tiny_tied):
    """The START message carries the options: the remote two-part cloud samples as HF generate does."""
    folder, model = tiny_tied
    config = SamplingConfig(do_sample=True, temperature=1.2, top_k=30, min_p=0.02, seed=11).resolved(model_generation_defaults(folder))
    pipeline = build_pipeline(str(folder), *TWO, "none", two_part=True, remote=RemoteCloud(servers["two"].url), with_tokenizer=False)
    try:
        result = pipeline.edge.generate(TURNS[0], 16, sampling=config)
    finally:
        pipeline.edge.link.close()
    assert result.token_ids == hf_sample(model, TURNS[0], 16, 11, temperature=1.2, top_k=30, min_p=0.02)


def test_a_failed_turn_leaves_no_half_updated_session(tiny_tied):
    from src.utils import ProtocolError

    folder, model = tiny_tied
    pipeline = build_pipeline(str(folder), *MOVING, "none", seed=4, with_tokenizer=False)
    cloud_link = pipeline.edge.link

    class Failing:
        def __init__(self) -> None:
            self.calls = 0

        def request(self, data: bytes) -> bytes:
            self.calls += 1
            if self.calls == NEW + 3:  # in the second turn
                raise ProtocolError("link lost (test)")
            return cloud_link.request(data)

    pipeline.edge.link = Failing()
    with pipeline.edge.session() as chat:
        first = chat.generate(TURNS[0], NEW)
        conversation = TURNS[0] + first.token_ids + TURNS[1]
        with pytest.raises(ProtocolError, match="link lost"):
            chat.generate(conversation, NEW)
        again = chat.generate(conversation, NEW)  # starts over: START and a full prefill
        assert again.cached_positions == 0 and again.token_ids == hf_greedy(model, conversation, NEW)[0]


def test_a_session_of_unrelated_conversations_starts_over_before_its_uplink_grows_without_bound(tiny_tied):
    """An edge server's one session serves conversation after conversation, each a TURN cutting the last one back, and
    the link keeps every message since START for a failover or reopen to replay (an edge server held 571 messages,
    16 MB, after 30 requests, and replayed them all after an idle pause). Now a request that keeps less than half of
    the cached sequence starts a new session, and so does one after more than REPLAY_BOUND positions per position of
    its sequence went up (regenerating an answer again and again); the answers stay HF's, and a growing conversation
    keeps its session."""
    from src.edge import REPLAY_BOUND
    from src.link.protocol import Kind, decode

    folder, model = tiny_tied
    pipeline = build_pipeline(str(folder), *MOVING, "none", with_tokenizer=False)
    edge = pipeline.edge
    send, kinds = edge.link.request, []
    edge.link.request = lambda data: kinds.append(decode(data, edge.hidden_size).kind) or send(data)
    with edge.session() as chat:
        for n in range(4):  # unrelated conversations sharing their first token: each a session of its own
            prompt = [1] + [(7 * n + i) % 90 + 2 for i in range(6)]
            assert chat.generate(prompt, NEW).token_ids == reference(model, prompt, None), n
        assert kinds.count(Kind.START) == 4 and Kind.TURN not in kinds
        kinds.clear()
        prompt = [1, 5, 9, 33, 17, 80, 3, 41, 7, 7, 60, 2]
        for n in range(20):  # the same question again: each request keeps all but its last position
            assert chat.generate(prompt, NEW).token_ids == reference(model, prompt, None), n
            assert edge.sent_positions <= REPLAY_BOUND * len(prompt) + len(prompt) + 3 * NEW, n  # one request past it at most
        assert 2 <= kinds.count(Kind.START) <= 6 and kinds.count(Kind.TURN) == 20 - kinds.count(Kind.START)
        chat.reset()
        kinds.clear()
        converse(chat, model, TURNS * 3)  # one conversation, nine turns: HF's tokens at each
    assert kinds.count(Kind.START) == 1 and kinds.count(Kind.TURN) == 8


def test_a_request_for_no_tokens_is_refused_and_the_session_goes_on(tiny_tied):
    """With 0 new tokens the edge told the cloud of the new positions and never ran them: the next request failed with
    "the edge says it processed 11 positions; the cloud's mirror says 14" and the conversation was lost."""
    from src.utils import TriadicError

    folder, model = tiny_tied
    pipeline = build_pipeline(str(folder), *MOVING, "none", seed=4, with_tokenizer=False)
    with pipeline.edge.session() as chat:
        first = chat.generate(TURNS[0], NEW)
        conversation = TURNS[0] + first.token_ids + TURNS[1]
        with pytest.raises(TriadicError, match="at least 1, not 0"):
            chat.generate(conversation, 0)
        again = chat.generate(conversation, NEW)
        assert again.cached_positions == len(TURNS[0]) + NEW - 1 and again.token_ids == hf_greedy(model, conversation, NEW)[0]
