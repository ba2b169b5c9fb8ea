"""Plumbing of the privacy attacks (bench/privacy/) on tiny random-init models: fast, no embedded model."""
import torch

from bench.privacy.attacks import LayerClassifier, Matcher, Replay, TokenProbe, clean_states, nearest_neighbour, recovery
from bench.privacy.capture import exposures, hidden_messages, lowest_exposure, record, schedule_from_start, transcode
from src.link import protocol
from src.link.protocol import Kind
from src.pipeline import build_pipeline

HIDDEN = 32  # tiny.py


def reference_states(model, token_ids):
    with torch.no_grad():
        return model(torch.tensor([token_ids]), output_hidden_states=True).hidden_states


def random_ids(n, seed):
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_recorded_messages_decode_to_the_right_layer_and_positions(tiny_tied):
    folder, model = tiny_tied
    pipeline = build_pipeline(str(folder), {2}, {3}, "none", with_tokenizer=False)
    text = random_ids(15, 0)
    rec = record(pipeline, text[:10], 6, forced_tokens=text[10:])
    assert protocol.decode(rec.requests[0], HIDDEN).kind is Kind.START
    up, down = hidden_messages(rec.requests, HIDDEN), hidden_messages(rec.replies, HIDDEN)
    assert [(m.step, m.start, m.count) for m in up] == [(0, 0, 10)] + [(t, 9 + t, 1) for t in range(1, 6)]
    assert [(m.step, m.start, m.count) for m in down] == [(m.step, m.start, m.count) for m in up]
    hs = reference_states(model, text)
    for m in up:
        torch.testing.assert_close(m.hidden, hs[2][0, m.start : m.start + m.count], atol=1e-4, rtol=1e-4)
    for m in down:
        torch.testing.assert_close(m.hidden, hs[3][0, m.start : m.start + m.count], atol=1e-4, rtol=1e-4)


def test_stop_at_uplink_and_transcode_give_the_bytes_of_a_real_int8_edge(tiny_tied):
    folder, _ = tiny_tied
    prompt = random_ids(12, 1)
    lossless = record(build_pipeline(str(folder), {1}, {3}, "none", with_tokenizer=False), prompt, 1, stop_at_uplink=True)
    int8 = record(build_pipeline(str(folder), {1}, {3}, "int8", with_tokenizer=False), prompt, 1, stop_at_uplink=True)
    assert lossless.generation is None and len(lossless.requests) == 2 and len(lossless.replies) == 1  # START answered, HIDDEN not sent on
    assert transcode(lossless.requests[-1], "int8", HIDDEN) == int8.requests[-1]


def test_random_cuts_schedule_from_start_and_exposures(tiny_tied):
    folder, model = tiny_tied
    pipeline = build_pipeline(str(folder), {1, 2}, {3, 4}, "none", seed=7, with_tokenizer=False)
    text = random_ids(30, 2)
    rec = record(pipeline, text[:6], 25, forced_tokens=text[6:])
    learned = schedule_from_start(rec.requests[0], HIDDEN, 4)
    assert (learned.first, learned.second, learned.seed) == ((1, 2), (3, 4), 7)
    found = exposures(hidden_messages(rec.requests, HIDDEN), lambda step: learned.cuts(step)[0])
    assert [e.layer for e in found] == [pipeline.schedule.cuts(e.step)[0] for e in found]
    hs = reference_states(model, text)
    for e in found:
        torch.testing.assert_close(e.states, hs[e.layer][0, e.start : e.start + len(e.states)], atol=1e-4, rtol=1e-4)
    layers, states = lowest_exposure(found, len(text))
    assert (layers >= 1).all() and (layers == 1).sum() > len(text) // 2  # most positions reach the lowest cut
    for position, layer in enumerate(layers.tolist()):
        torch.testing.assert_close(states[position], hs[layer][0, position], atol=1e-4, rtol=1e-4)


def test_probe_recovers_layer0_tokens(tiny_tied):
    _, model = tiny_tied
    embeddings = model.model.embed_tokens.weight.detach()
    train, train_tokens = clean_states(model, random_ids(1500, 3), [0, 1], chunk=150)
    test, test_tokens = clean_states(model, random_ids(300, 4), [0, 1], chunk=150)
    probe = TokenProbe.fit(embeddings, train[0], train_tokens)
    assert recovery(probe.predict(test[0]), test_tokens) > 0.95
    assert recovery(nearest_neighbour(test[0], embeddings), test_tokens) == 1.0
    assert probe.top(test[0], 3).shape == (300, 3)


def test_matcher_inverts_layer1_with_the_public_weights(tiny_tied):
    _, model = tiny_tied
    tokens = torch.tensor(random_ids(40, 5))
    observed = reference_states(model, tokens.tolist())[1][0]
    wrong = torch.tensor(random_ids(40 * 3, 6)).view(40, 3)
    candidates = torch.cat([wrong, tokens[:, None]], 1)  # the true token last among 4
    layer_of = torch.ones(40, dtype=torch.long)
    matched = Matcher(model).match(observed, layer_of, candidates, guess=tokens)
    assert recovery(matched, tokens) == 1.0
    layer_of[::2] = -1  # positions never seen keep the guess
    guess = torch.full((40,), 3)
    matched = Matcher(model).match(observed, layer_of, candidates, guess=guess)
    assert (matched[::2] == 3).all()


def test_replays_reproduce_the_emitted_tokens(tiny_tied):
    folder, _ = tiny_tied
    pipeline = build_pipeline(str(folder), {1, 2}, {3, 4}, "none", seed=3, with_tokenizer=False)
    rec = record(pipeline, random_ids(8, 7), 12)
    schedule = schedule_from_start(rec.requests[0], HIDDEN, 4)
    tail = Replay(folder, pipeline.config, schedule, 3)
    full = Replay(folder, pipeline.config, schedule, 1)
    ups, downs = hidden_messages(rec.requests, HIDDEN), hidden_messages(rec.replies, HIDDEN)
    assert len(ups) == len(downs) == 12
    for up, down in zip(ups, downs):
        a, b = schedule.cuts(down.step)
        emitted = rec.generation.token_ids[down.step]
        assert int(tail.feed(b, down.start, down.hidden).argmax()) == emitted
        assert int(full.feed(a, up.start, up.hidden).argmax()) == emitted


def test_layer_classifier_names_the_layer_of_a_message():
    generator = torch.Generator().manual_seed(0)
    states = {1: torch.randn(200, 16, generator=generator), 2: 10 * torch.randn(200, 16, generator=generator)}
    classifier = LayerClassifier([1, 2], states)
    assert classifier.predict_message(10 * torch.randn(5, 16, generator=generator)) == 2
    assert classifier.predict_message(torch.randn(5, 16, generator=generator)) == 1
