"""Cross-session batching: concurrent sessions' layer work runs together and each gets its tokens alone."""
import dataclasses
import os
import subprocess
import sys
import threading

import pytest
import torch

from families import make_family_checkpoint
from src.serve.batching import PACKED_ATTENTION, Batcher, enable_packing
from src.checkpoint import is_column_major, load_config
from src.cloud import Cloud
from src.link.local import LocalLink
from src.panels import PanelLinear, use_panels, why_no_kernel
from src.pipeline import build_cloud, build_edge, build_pipeline
from src.schedule import SplitSchedule
from tests.conftest import ROOT

FIRST, SECOND = {0, 1, 2}, {2, 3}
PROMPTS = [[1, 5, 9, 33, 17, 80, 3, 41], [7, 7, 12], [90, 4, 61, 22, 8, 15, 30, 2, 66, 71, 5], [3]]
NEW = [20, 14, 20, 9]  # sessions end at different steps: the others go on batching without them


def each_in_a_thread(work, count: int) -> None:
    """work(0) .. work(count - 1), each in a thread of its own, all at once; returns when all have."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)


@pytest.mark.parametrize("max_rows", [128, 4])  # 4: the 8- and 11-token prompts run a call at a time between batches
def test_concurrent_sessions_give_their_tokens_alone(tiny_untied, max_rows):
    folder, _ = tiny_untied
    config = load_config(folder)
    alone = []
    for i, (prompt, new) in enumerate(zip(PROMPTS, NEW)):
        pipeline = build_pipeline(str(folder), FIRST, SECOND, seed=i, with_tokenizer=False)
        alone.append(pipeline.edge.generate(prompt, new, keep_logits=True))

    schedule = SplitSchedule(tuple(FIRST), tuple(SECOND), config.num_hidden_layers)
    part = build_cloud(folder, config, schedule).part  # one part, shared by every session's Cloud
    enable_packing(part)
    batcher = Batcher(window=0.2, max_rows=max_rows)
    clouds, edges = [], []
    for i in range(len(PROMPTS)):
        clouds.append(Cloud(schedule, part))
        clouds[i].batcher = batcher
        edges.append(build_edge(folder, config, dataclasses.replace(schedule, seed=i), "none", link=LocalLink(clouds[i])))
    results = [None] * len(PROMPTS)

    def session(i: int) -> None:
        try:
            results[i] = edges[i].generate(PROMPTS[i], NEW[i], keep_logits=True)
        finally:
            batcher.forget(clouds[i])  # as the server does when a stream ends

    each_in_a_thread(session, len(PROMPTS))
    for i, (together, single) in enumerate(zip(results, alone)):
        assert together.token_ids == single.token_ids, i
        assert together.splits == single.splits and len(set(together.splits)) > 1, i
        assert max((x - y).abs().max().item() for x, y in zip(together.logits, single.logits)) < 1e-4, i
        assert together.layer_evals == single.layer_evals, i
    # The sessions really ran together: several steps per batch, fewer batches than steps.
    assert batcher.largest >= 3 and batcher.batches < batcher.steps


def test_bf16_lossless_sessions_catch_up_step_by_step_when_batched_as_alone(embedded, japan_ids):
    """Lossless in bf16 a lagging layer replays HF's steps (`Party.segments`) rather than one chunk, whose sums can
    flip a near-tie. Batched, such a session runs those layers alone, so its replies equal its replies alone byte for
    byte (on bf16 panels every row's product is its own). Packed as one chunk, three SmolLM2 sessions' replies
    differed from their fourth or fifth step on (a helper's attack), and an edge's tokens from its 13th."""
    from src.panels import why_not_paneled
    from src.pipeline import SideOptions
    from src.serve.cloud_server import DEFAULT_FIRST, DEFAULT_SECOND
    from src.utils import format_prompt, parse_layer_set

    folder, _, tokenizer = embedded
    config = load_config(folder)
    schedule = SplitSchedule(tuple(parse_layer_set(DEFAULT_FIRST, "--first")), tuple(parse_layer_set(DEFAULT_SECOND, "--second")),
                             config.num_hidden_layers)
    bf16 = SideOptions(dtype=torch.bfloat16)
    part = build_cloud(folder, config, schedule, side=bf16).part
    reason = why_not_paneled(part.model.layers[schedule.cloud_layers[0]].mlp.up_proj.weight)
    if reason is not None:
        pytest.skip(f"bf16 products are bit for bit per row only on bf16 panels: {reason}")
    enable_packing(part)
    assert use_panels(part) is None
    sessions = []  # each session's requests, recorded from an edge and a cloud of its own in one process
    prompts = [japan_ids, format_prompt(tokenizer, "Why is the sky blue?", "auto"), format_prompt(tokenizer, "Name a cat.", "auto")]
    for seed, prompt in enumerate(prompts):
        pipeline = build_pipeline(str(folder), schedule.first, schedule.second, "none", seed=seed, with_tokenizer=False,
                                  edge_side=bf16, cloud_side=bf16)
        send, requests = pipeline.edge.link.request, []
        pipeline.edge.link.request = lambda data, requests=requests, send=send: requests.append(bytes(data)) or send(data)
        pipeline.edge.generate(prompt, 16)
        sessions.append(requests)

    def replay(group: list[list[bytes]]) -> list[list[bytes]]:
        batcher, replies = Batcher(window=0.2), [[] for _ in group]
        clouds = [Cloud(schedule, part) for _ in group]

        def session(i: int) -> None:
            clouds[i].batcher = batcher
            try:
                replies[i] = [clouds[i].handle(request) for request in group[i]]
            finally:
                batcher.forget(clouds[i])

        each_in_a_thread(session, len(group))
        assert len(group) == 1 or batcher.largest == len(group)
        return replies

    alone = [replay([requests])[0] for requests in sessions]
    assert replay(sessions) == alone


def test_packed_attention_without_packing_is_sdpa(tiny_tied):
    """A part switched to packed attention gives the same tokens when a session runs alone."""
    folder, _ = tiny_tied
    reference = build_pipeline(str(folder), {1}, {3}, with_tokenizer=False).edge.generate(PROMPTS[0], 12, keep_logits=True)
    pipeline = build_pipeline(str(folder), {1}, {3}, with_tokenizer=False)
    enable_packing(pipeline.cloud.part)
    result = pipeline.edge.generate(PROMPTS[0], 12, keep_logits=True)
    assert result.token_ids == reference.token_ids
    assert all(torch.equal(x, y) for x, y in zip(result.logits, reference.logits))


def test_column_major_weights_hold_the_same_values_and_give_the_same_tokens(tiny_untied):
    """A batching server in fp32 stores its layers' linear weights transposed in memory: same values, same tokens."""
    folder, model = tiny_untied
    config = load_config(folder)
    reference = build_pipeline(str(folder), FIRST, SECOND, with_tokenizer=False).edge.generate(PROMPTS[2], 12, keep_logits=True)
    schedule = SplitSchedule(tuple(FIRST), tuple(SECOND), config.num_hidden_layers)
    cloud = build_cloud(folder, config, schedule, column_major=True)
    linears = [m for m in cloud.part.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(is_column_major(m.weight) for m in linears)
    assert all(torch.equal(p, model.get_parameter(name)) for name, p in cloud.part.named_parameters())
    edge = build_edge(folder, config, schedule, "none", link=LocalLink(cloud))
    result = edge.generate(PROMPTS[2], 12, keep_logits=True)
    assert result.token_ids == reference.token_ids
    assert max((x - y).abs().max().item() for x, y in zip(result.logits, reference.logits)) < 1e-4


def test_sessions_that_started_are_waited_for_so_a_burst_runs_its_prefills_together(tiny_untied):
    """A session's START makes the batcher expect it: the first step of another waits for its prefill."""
    import time

    from src.link import protocol

    class SlowFirstStep(LocalLink):
        """Delays the first HIDDEN message: the sessions' STARTs are in before any prefill arrives."""

        def __init__(self, cloud, delay: float) -> None:
            super().__init__(cloud)
            self.delay = delay

        def request(self, data: bytes) -> bytes:
            if self.delay and data[: len(protocol.MAGIC)] == protocol.MAGIC and protocol.HEADER.unpack_from(data)[2] == protocol.Kind.HIDDEN:
                time.sleep(self.delay)
                self.delay = 0.0
            return super().request(data)

    folder, _ = tiny_untied
    batcher = Batcher(window=2.0)
    sizes = []
    run = batcher._run
    batcher._run = lambda batch: (sizes.append(len(batch)), run(batch))
    clouds, edges = _sessions(folder, batcher, 2)
    for edge, cloud, delay in zip(edges, clouds, (0.05, 0.4)):
        edge.link = SlowFirstStep(cloud, delay)
    results = _together(edges, clouds, batcher, 4)
    assert all(not isinstance(r, BaseException) for r in results)
    assert sizes[0] == 2, sizes  # without `expect`, the first prefill ran alone: [1, 1, 2, ...]


class _Alone:
    """A party whose batch of one runs its own `_run_layers`, which does nothing: only the batcher's waiting is timed."""

    on_layer = None
    fill = [0, 0]

    def _run_layers(self, lo: int, hi: int, end: int) -> None:
        pass

    def prune(self) -> None:
        pass

    def segment_end(self, position: int, end: int) -> int:
        return end


def _seconds_to_run(batcher: Batcher, party: _Alone, end: int) -> float:
    import time

    began = time.monotonic()
    batcher.run(party, 0, 1, end)
    return time.monotonic() - began


def test_a_session_that_starts_and_never_steps_holds_the_others_back_for_one_window_only():
    """`expect` lasts one window: then a session that started but sent no step is no longer waited for, even where it
    sends START again and again (each START re-armed the wait: a flood every 20 ms held every step back by a window)."""
    import time

    batcher, idle, party = Batcher(window=0.3, horizon=0.5), _Alone(), _Alone()
    batcher.expect(idle)  # started, never steps
    first = _seconds_to_run(batcher, party, 1)
    batcher.expect(idle)  # started again, still without a step
    second = _seconds_to_run(batcher, party, 2)
    assert 0.25 <= first < 1.0 and second < 0.1, (first, second)
    batcher.run(idle, 0, 1, 1)  # once it has stepped (and its horizon passed), a new START of it is waited for once more
    time.sleep(0.6)
    batcher.expect(idle)
    assert 0.25 <= _seconds_to_run(batcher, party, 3) < 1.0


def test_a_session_slower_than_the_window_is_not_waited_for():
    """A session that comes back more than a window after its reply (a slow edge, a long round trip, a client stepping
    once a second) is not waited for: waited for, one session stepping once a second held every other session's step
    for a whole window (24-29 ms steps took 124-131 ms). Once it keeps pace again, it is waited for again."""
    import time

    batcher, slow, fast = Batcher(window=0.25, horizon=5.0), _Alone(), _Alone()
    batcher.run(slow, 0, 1, 1)
    time.sleep(0.4)  # it comes back later than a window after its reply
    batcher.run(slow, 0, 1, 2)
    waits = [_seconds_to_run(batcher, fast, end) for end in range(1, 6)]
    assert max(waits) < 0.1, waits  # every one of them waited the window before
    batcher.run(slow, 0, 1, 3)  # at once after its reply: keeping pace, and mid-generation
    assert 0.2 <= _seconds_to_run(batcher, fast, 6) < 1.0


def _sessions(folder, batcher, count):
    """`count` edges over LocalLinks to Clouds that share one packed part and `batcher`."""
    config = load_config(folder)
    schedule = SplitSchedule(tuple(FIRST), tuple(SECOND), config.num_hidden_layers)
    part = build_cloud(folder, config, schedule).part
    enable_packing(part)
    clouds = [Cloud(schedule, part) for _ in range(count)]
    for cloud in clouds:
        cloud.batcher = batcher
    edges = [build_edge(folder, config, dataclasses.replace(schedule, seed=i), "none", link=LocalLink(c)) for i, c in enumerate(clouds)]
    return clouds, edges


def _together(edges, clouds, batcher, new, prompts=PROMPTS):
    """Each edge generates from its prompt in its own thread; a failed session's result is its exception."""
    results = [None] * len(edges)

    def session(i: int) -> None:
        try:
            results[i] = edges[i].generate(prompts[i], new, keep_logits=True)
        except Exception as error:  # noqa: BLE001
            results[i] = error
        finally:
            batcher.forget(clouds[i])

    each_in_a_thread(session, len(edges))
    return results


class _Slow(_Alone):
    """A party of `layers` layers whose every layer call takes `seconds`, with its calls (layer, end) on record: one per
    piece (`segment_end`), as Party._run_layers makes them."""

    def __init__(self, layers: int, seconds: float) -> None:
        self.fill, self.seconds, self.calls = [0] * (layers + 1), seconds, []

    def _run_layers(self, lo: int, hi: int, end: int) -> None:
        import time

        for index in range(lo, hi):
            while self.fill[index] < end:
                stop = self.segment_end(self.fill[index], end)
                time.sleep(self.seconds)
                self.calls.append((index, stop))
                self.fill[index] = stop


def _waits_beside(batcher: Batcher, long: "_Slow", end: int, short: "_Slow", steps: int, delay: float) -> list[float]:
    """Seconds each of `steps` one-position steps of `short` took, the first `delay` s after `long` set out (from its own
    thread) to run all its layers up to `end`, which it has done when this returns."""
    import time

    thread = threading.Thread(target=batcher.run, args=(long, 0, len(long.fill) - 1, end))
    thread.start()
    time.sleep(delay)
    waits = []
    for _ in range(steps):
        began = time.monotonic()
        batcher.run(short, 0, len(short.fill) - 1, short.fill[0] + 1)
        waits.append(time.monotonic() - began)
    thread.join(timeout=10)
    return waits


def test_a_long_prefill_runs_a_layer_at_a_time_between_the_other_sessions_steps():
    """A step longer than a batch's rows does not hold the others back for its whole length: its layers run one at a
    time between their batches (an attack: a 1,024-position prefill, within every limit, stalled every other session's
    steps for 3 s, and got them refused past their deadline)."""
    batcher = Batcher(window=0.05, max_rows=256)
    long, short = _Slow(10, 0.1), _Slow(10, 0.001)
    waits = _waits_beside(batcher, long, 1000, short, 5, delay=0.15)  # from within its second layer
    assert max(waits) < 0.35, waits  # one layer of the prefill at most, then its own (the whole prefill: 1 s)
    assert long.calls == [(index, 1000) for index in range(10)]  # every layer once, in order, to the end
    assert len(short.calls) == 50 and long.calls[-1] and batcher.steps == 6


class _Pieces(_Slow):
    """A party whose lagging layers catch up one position per call (lossless bf16), each call taking `seconds`."""

    def segment_end(self, position: int, end: int) -> int:
        return position + 1


def test_a_catch_up_of_many_calls_runs_a_call_at_a_time_between_the_other_sessions_steps():
    """60 positions under the row cap, but a call each in each of 3 layers (1.8 s): one call at a time between the
    others' batches. Packed, it held them for all its calls (an attack in bf16: 4.7 s per honest step; in the long
    lane a layer at a time, 10 s per layer of 4,000 calls)."""
    batcher, long, short = Batcher(window=0.05), _Pieces(3, 0.01), _Slow(3, 0.0)
    waits = _waits_beside(batcher, long, 60, short, 5, delay=0.1)
    assert max(waits) < 0.1, waits
    assert long.calls == [(index, position) for index in range(3) for position in range(1, 61)]


def _timed_runs(batcher: Batcher, steps: list[tuple[str, "_Slow", int]]) -> dict[str, float]:
    """Each (name, party, end) step over all the party's layers, from its own thread, all pending before the worker
    starts: seconds to done."""
    import time

    waits: dict[str, float] = {}
    began = time.monotonic()

    def run(name: str, party: _Slow, rows: int) -> None:
        batcher.run(party, 0, len(party.fill) - 1, rows)
        waits[name] = time.monotonic() - began

    batcher._worker = threading.Thread(target=batcher._loop, name="cloud-batcher", daemon=True)  # not started yet
    threads = [threading.Thread(target=run, args=step) for step in steps]
    for thread in threads:
        thread.start()
        time.sleep(0.01)  # in this order
    with batcher._cond:
        assert batcher._cond.wait_for(lambda: len(batcher._pending) == len(steps), timeout=5)
    began = time.monotonic()
    batcher._worker.start()
    for thread in threads:
        thread.join(timeout=10)
    return waits


def test_steps_a_full_batch_leaves_behind_run_next_without_waiting_again():
    """Three 12-row steps under a 16-row cap run in three batches, one after the other, not a window apart each (they
    waited 0.05, 0.35 and 0.65 s: the steps left behind waited for the sessions just served)."""
    waits = _timed_runs(Batcher(window=0.3, max_rows=16), [(f"s{i}", _Slow(1, 0.0), 12) for i in range(3)])
    assert max(waits.values()) < 0.2, waits


def test_a_decode_step_joins_the_next_batch_whatever_larger_steps_wait():
    """Three steps of the cap's full 16 rows, 0.2 s each, and a 1-row step: the decode step joins the first batch beside
    the step waiting longest (it queued behind each of them in turn: 0.61 s, and 5 s beside six clients' steps)."""
    steps = [(f"big{i}", _Slow(1, 0.2), 16) for i in range(3)] + [("small", _Slow(1, 0.0), 1)]
    waits = _timed_runs(Batcher(window=0.0, max_rows=16), steps)
    assert waits["small"] < 0.3 and max(waits.values()) > 0.5, waits


def test_decode_steps_run_before_the_prompts_of_their_batch():
    """A 100-row prompt (0.3 s) pending longest, and a 1-row step: the decode step runs first, on its own, not after the
    prompt (beside clients looping prompts of the cap's 128 rows an honest step waited 0.76 s; with this alone 0.40 s,
    the batch under way). The prompt still runs next."""
    steps = [("prompt", _Slow(1, 0.3), 100), ("decode", _Slow(1, 0.0), 1)]
    waits = _timed_runs(Batcher(window=0.0), steps)
    assert waits["decode"] < 0.15 and 0.3 <= waits["prompt"] < 0.6, waits


def test_a_decode_step_that_catches_a_prompt_up_in_one_layer_joins_the_next_batch():
    """A decode step whose first layer lagged since the prefill runs 40 rows there and one in 9 others: a decode step
    (`is_light`), so it joins the next batch beside a 128-row prompt and runs first. By its rows alone it fit beside
    neither of two such prompts and waited for both (1.2 s for an honest step beside looping prompts)."""
    prompts = [_Slow(10, 0.02) for _ in range(2)]
    catching_up = _Slow(10, 0.0)
    catching_up.fill = [0] + [39] * 9 + [0]
    steps = [("prompt0", prompts[0], 128), ("prompt1", prompts[1], 128), ("decode", catching_up, 40)]
    waits = _timed_runs(Batcher(window=0.0, max_rows=128), steps)
    assert waits["decode"] < 0.1 < waits["prompt0"] < waits["prompt1"], waits


def test_a_decode_step_runs_between_the_layer_calls_of_another_sessions_prompt():
    """A session's new 99-row prompt (10 layers at 0.05 s, more than FAST_ROWS a layer) is under way; a decode step of
    another session runs between two of its layer calls, not after all of them (0.5 s; beside 3 clients looping prompts
    of the cap's 128 rows an honest step waited 0.40 s, now 0.06 s). Not while a new session's first step is under way
    (so that a burst of new sessions stays in step): then the decode step waits for it."""
    def waits_beside(prompt: _Slow, batcher: Batcher) -> list[float]:
        waits = _waits_beside(batcher, prompt, 100, decode, 3, delay=0.12)  # from within its third layer
        assert prompt.calls == [(index, 100) for index in range(10)], prompt.calls  # every layer once, in order
        return waits

    batcher, decode = Batcher(window=0.05), _Slow(10, 0.0)
    batcher.run(decode, 0, 10, 1)  # decoding
    first = waits_beside(_Slow(10, 0.05), batcher)  # a new session's prompt
    assert first[0] > 0.3 and batcher.between == 0, first
    prompt = _Slow(10, 0.05)
    batcher.run(prompt, 0, 10, 1)  # a session that has stepped, now with a new turn's prompt
    batcher.expect(prompt)  # started again on its stream: not a new session (START before each prompt held all back)
    prompt.calls.clear()
    later = waits_beside(prompt, batcher)
    assert max(later) < 0.2 and batcher.between == 3, later
    assert decode.fill == [7] * 10 + [0]


def test_a_session_decoding_since_before_a_new_sessions_prompt_runs_between_its_layer_calls():
    """The guard for a burst of new sessions holds back only the sessions born with it: a session decoding since
    `burst` seconds before a new session's first prompt runs between that prompt's layer calls. A client opening a
    stream for each prompt made every prompt a new session's and held every other session's steps back (0.4 s)."""
    import time

    # A burst of 1 s: far above what a loaded host adds between two steps here, far below what the first session waits.
    batcher, decode = Batcher(window=0.05, burst=1.0), _Slow(10, 0.0)
    # The prompts' sessions live to the end: the batcher knows a session by id() until the server forgets it (when its
    # stream ends), and `young`, made where the first prompt had been freed, once took its id and so its age (settled:
    # it waited 0.08 s), in a full run only.
    prompts = [_Slow(10, 0.05), _Slow(10, 0.05)]
    batcher.run(decode, 0, 10, 1)
    time.sleep(1.1)  # decoding for longer than a burst before the new session came
    waits = _waits_beside(batcher, prompts[0], 100, decode, 3, delay=0.12)
    assert max(waits) < 0.2 and batcher.between == 3, waits
    young = _Slow(10, 0.0)  # born within a burst of the next new session: part of it, it waits
    batcher.run(young, 0, 10, 1)
    waits = _waits_beside(batcher, prompts[1], 100, young, 1, delay=0.12)
    assert waits[0] > 0.3 and batcher.between == 3, waits


def test_a_decode_step_that_catches_up_a_position_a_call_runs_as_a_decode_step():
    """Lossless in bf16 a lagging layer catches up a position per call (`Party.segments`); a decode step that does so for
    a few positions is still a decode step: it runs first beside a prompt, not in the long lane after it (an honest bf16
    session beside clients looping 128-row prompts waited 4.8 s a step, 8.2 s at most)."""
    catching_up = _Pieces(10, 0.0)
    catching_up.fill = [0] + [4] * 9 + [0]  # 5 positions in its first layer, one in the others: 14 calls
    steps = [("prompt", _Slow(10, 0.03), 100), ("decode", catching_up, 5)]
    waits = _timed_runs(Batcher(window=0.0), steps)
    assert waits["decode"] < 0.15 < waits["prompt"], waits
    assert catching_up.calls[:5] == [(0, position) for position in range(1, 6)] and len(catching_up.calls) == 14


def test_decode_steps_run_between_a_prompts_layers_give_the_replies_they_give_alone(tiny_untied):
    """One session decodes while another's second turn, an 80-position prompt (more than FAST_ROWS a layer), runs layer
    by layer, slowed by its check: the decode steps run between the prompt's layer calls, and every reply of both is
    the one it gets alone, byte for byte."""
    import time

    folder, _ = tiny_untied
    config = load_config(folder)
    schedule = SplitSchedule((1,), (3,), config.num_hidden_layers)  # the cloud runs layers 1 and 2
    sessions = []
    for seed, turns in enumerate([[(PROMPTS[0], 12)], [([3, 4], 1), (list(range(5, 85)), 1)]]):
        pipeline = build_pipeline(str(folder), {1}, {3}, "none", seed=seed, with_tokenizer=False)
        send, requests = pipeline.edge.link.request, []
        pipeline.edge.link.request = lambda data, requests=requests, send=send: requests.append(bytes(data)) or send(data)
        sequence: list[int] = []
        for n, (tokens, new) in enumerate(turns):
            if n == 1:
                second_turn = len(requests)  # the index of the second turn's first request
            sequence += tokens
            result = (pipeline.edge.generate if n == 0 else pipeline.edge.continue_with)(sequence, new)
            sequence += result.token_ids
        sessions.append(requests)
    part = build_cloud(folder, config, schedule).part
    enable_packing(part)
    alone = []
    for requests in sessions:
        cloud = Cloud(schedule, part)
        alone.append([cloud.handle(request) for request in requests])

    # The prompt comes just after a decode step's reply; the decoding session's next step comes 0.08 s after its
    # reply, during the prompt's first layer (0.15 s each), and runs before its second.
    batcher, replies, between_steps = Batcher(window=0.02), [[], []], threading.Event()
    clouds = [Cloud(schedule, part) for _ in sessions]

    def session(i: int) -> None:
        clouds[i].batcher = batcher
        try:
            for n, request in enumerate(sessions[i]):
                if i == 1 and n == second_turn:
                    between_steps.wait(10)
                    clouds[1].on_layer = lambda: time.sleep(0.15)
                replies[i].append(clouds[i].handle(request))
                if i == 0:
                    if n == 4:
                        between_steps.set()
                    time.sleep(0.08)
        finally:
            batcher.forget(clouds[i])

    each_in_a_thread(session, 2)
    assert batcher.between >= 1
    assert replies == alone


def test_a_long_step_keeps_only_the_states_its_next_layers_need(tmp_path):
    """Run a layer at a time, a 90-position prefill through 6 cloud layers stores what it stores run whole (it held
    every layer's output until the step's end: 630 positions instead of 180)."""
    from tiny import make_tiny_checkpoint

    folder, _ = make_tiny_checkpoint(tmp_path, seed=1, num_layers=8, tie=False)
    config = load_config(folder)
    schedule = SplitSchedule((1,), (7,), 8)
    pipeline = build_pipeline(str(folder), {1}, {7}, "none", with_tokenizer=False)
    send, requests = pipeline.edge.link.request, []
    pipeline.edge.link.request = lambda data: requests.append(bytes(data)) or send(data)
    pipeline.edge.generate(list(range(3, 93)), 2)
    part = build_cloud(folder, config, schedule).part
    enable_packing(part)
    peaks, replies = [], []
    for batcher in (None, Batcher(0.01, max_rows=16)):  # unbatched; and the prefill as a long step
        cloud = Cloud(schedule, part)
        cloud.batcher = batcher
        replies.append([cloud.handle(request) for request in requests])
        peaks.append(cloud.peak_stored)
    assert peaks == [180, 180] and replies[0] == replies[1]


def test_one_failing_session_fails_only_itself(tiny_untied, monkeypatch):
    """A session stopped between layers (cancelled) drops out of its batch; a packed call that fails is
    rolled back and its sessions finish one by one; every other session gets its tokens alone."""
    import src.serve.batching as batching

    folder, _ = tiny_untied
    alone = [build_pipeline(str(folder), FIRST, SECOND, seed=i, with_tokenizer=False).edge.generate(PROMPTS[i], 10, keep_logits=True)
             for i in range(3)]
    batcher = Batcher(window=0.2)
    clouds, edges = _sessions(folder, batcher, 3)
    calls = {"layers": 0, "updates": 0}

    def stop_after_8_layers() -> None:
        calls["layers"] += 1
        if calls["layers"] > 8:
            raise RuntimeError("cancelled")

    clouds[2].on_layer = stop_after_8_layers
    real_update = batching.PackedCache.update

    def update_failing_once(self, *args, **kwargs):
        out = real_update(self, *args, **kwargs)
        calls["updates"] += 1
        if calls["updates"] == 3:  # after the caches took this layer's keys: they must be rolled back
            raise RuntimeError("injected")
        return out

    monkeypatch.setattr(batching.PackedCache, "update", update_failing_once)
    results = _together(edges, clouds, batcher, 10)
    assert isinstance(results[2], RuntimeError) and "cancelled" in str(results[2])
    for i in (0, 1):
        assert results[i].token_ids == alone[i].token_ids, i
        assert max((x - y).abs().max().item() for x, y in zip(results[i].logits, alone[i].logits)) < 1e-4, i
    assert calls["updates"] > 3 and batcher.largest >= 2


def test_a_packed_call_failing_between_a_prompts_layers_fails_no_session(tiny_untied, monkeypatch):
    """Two sessions decode while a third's second-turn prompt runs layer by layer; a packed call of the decode steps run
    between its layer calls fails once. It is rolled back and those sessions finish one by one: all three get their
    tokens alone."""
    import time

    import src.serve.batching as batching

    folder, _ = tiny_untied
    config = load_config(folder)
    schedule = SplitSchedule((1,), (3,), config.num_hidden_layers)  # the cloud runs layers 1 and 2
    turns = [[(PROMPTS[0], 16)], [([3, 4], 1), (list(range(5, 85)), 2)], [(PROMPTS[2], 16)]]
    decoding, in_prompt = threading.Event(), threading.Event()  # the others are decoding; the prompt is under way

    def slow_prompt_layer() -> None:
        in_prompt.set()
        time.sleep(0.1)

    def run(edge, cloud, i: int, on_token=None) -> list:
        sequence, results = [], []
        for n, (prompt, new) in enumerate(turns[i]):
            if n == 1 and on_token is None and cloud.batcher is not None:
                decoding.wait(10)
                cloud.on_layer = slow_prompt_layer
            sequence += prompt
            result = (edge.generate if n == 0 else edge.continue_with)(sequence, new, keep_logits=True, on_token=on_token)
            sequence += result.token_ids
            results.append(result)
        return results

    part = build_cloud(folder, config, schedule).part
    enable_packing(part)
    alone = []
    for i in range(3):
        cloud = Cloud(schedule, part)
        alone.append(run(build_edge(folder, config, dataclasses.replace(schedule, seed=i), "none", link=LocalLink(cloud)), cloud, i))

    batcher = Batcher(window=0.05)
    clouds = [Cloud(schedule, part) for _ in range(3)]
    for cloud in clouds:
        cloud.batcher = batcher
    edges = [build_edge(folder, config, dataclasses.replace(schedule, seed=i), "none", link=LocalLink(clouds[i])) for i in range(3)]
    real_update, failed = batching.PackedCache.update, []

    def update_failing_once_in_the_prompt(self, *args, **kwargs):
        out = real_update(self, *args, **kwargs)
        if in_prompt.is_set() and not failed:
            failed.append(batcher.between)
            raise RuntimeError("injected")
        return out

    monkeypatch.setattr(batching.PackedCache, "update", update_failing_once_in_the_prompt)
    results: list = [None] * 3

    def session(i: int) -> None:
        steps = [0]

        def paced(token: int) -> None:  # the decoding sessions step every 20 ms; the prompt comes at their 4th token
            time.sleep(0.02)
            steps[0] += 1
            if steps[0] == 4:
                decoding.set()

        try:
            results[i] = run(edges[i], clouds[i], i, on_token=None if i == 1 else paced)
        finally:
            batcher.forget(clouds[i])

    each_in_a_thread(session, 3)
    assert failed and failed[0] >= 1, failed  # it failed in a batch run between the prompt's layer calls
    for i in range(3):
        for together, single in zip(results[i], alone[i]):
            assert together.token_ids == single.token_ids, i
            assert max((x - y).abs().max().item() for x, y in zip(together.logits, single.logits)) < 1e-4, i


@pytest.mark.parametrize("model_type", ["qwen2", "gemma3_text", "granite", "diffllama"])
def test_families_batch_to_their_tokens_alone_or_are_declared_unbatchable(model_type, tmp_path):
    """Sliding windows, a rotary per layer type, an attention multiplier: batched tokens equal each session's
    alone. DiffLlama splits its values after the cache update: it is refused by name, and where packing is
    forced anyway, the first packed call finds out and its sessions run one by one, to the same tokens."""
    folder, _ = make_family_checkpoint(tmp_path, model_type)
    config = load_config(folder)
    prompts = [[1, 5, 9, 33, 17, 80, 3, 41, 7, 12, 50], [7, 7, 12], [90, 4, 61, 22, 8, 15, 30, 2, 66, 71, 5]]
    alone = [build_pipeline(str(folder), FIRST, SECOND, seed=i, with_tokenizer=False).edge.generate(prompt, 8, keep_logits=True)
             for i, prompt in enumerate(prompts)]
    schedule = SplitSchedule(tuple(FIRST), tuple(SECOND), config.num_hidden_layers)
    part = build_cloud(folder, config, schedule, column_major=True).part  # as a batching server builds it
    assert (use_panels(part) is None) is (why_no_kernel() is None)  # and, where the kernel runs, as panels
    if model_type == "diffllama":
        with pytest.raises(ValueError, match="diffllama"):
            enable_packing(part)
        part.config._attn_implementation = PACKED_ATTENTION
    else:
        enable_packing(part)
    batcher = Batcher(window=0.3)
    clouds = [Cloud(schedule, part) for _ in prompts]
    for cloud in clouds:
        cloud.batcher = batcher
    edges = [build_edge(folder, config, dataclasses.replace(schedule, seed=i), "none", link=LocalLink(c)) for i, c in enumerate(clouds)]
    results = _together(edges, clouds, batcher, 8, prompts)
    for i, (together, single) in enumerate(zip(results, alone)):
        assert together.token_ids == single.token_ids, i
        assert max((x - y).abs().max().item() for x, y in zip(together.logits, single.logits)) < 1e-4, i
    assert batcher.largest >= 2


@pytest.mark.parametrize("model_type", ["llama", "diffllama"])
def test_a_server_reads_its_weights_once_in_the_layout_its_batching_needs(model_type, tmp_path, monkeypatch):
    """The server asks whether its part can batch before reading any weight: a batchable family is read once,
    column-major, and batches (on one torch thread or two, its linear layers then rewritten as panels where the
    kernel runs); DiffLlama is read once, in transformers' layout (what HF computes), and does not."""
    import src.models
    from src.serve.cloud_server import load, make_parser

    folder, _ = make_family_checkpoint(tmp_path, model_type)
    reads = []
    real = src.models.read_tensors
    monkeypatch.setattr(src.models, "read_tensors", lambda *args, **kwargs: reads.append(args[1]) or real(*args, **kwargs))
    threads = torch.get_num_threads()
    try:
        for flags in (["--threads", "2"], ["--threads", "1"]):
            loaded = load(make_parser().parse_args(["--base-model", str(folder), "--port", "0", "--first", "1", "--second", "3", *flags]))
            service = loaded.service
            batches = model_type != "diffllama"
            assert len(reads) == 1 and "model.layers.1.mlp.up_proj.weight" in reads[0]
            assert (service.batcher is not None) is batches
            up = service.part.model.layers[1].mlp.up_proj
            if batches and why_no_kernel() is None:  # panels, made from the column-major weights
                assert isinstance(up, PanelLinear)
            else:
                assert is_column_major(up.weight) is batches
            reads.clear()
    finally:
        torch.set_num_threads(threads)


THREADS_SCRIPT = """
import os, sys, threading, torch
from src.serve.batching import Batcher
from src.utils import adopt_torch_threads
torch.set_num_threads(1)
weights = torch.randn(512, 512)

def product_adds_threads() -> bool:
    before = len(os.listdir('/proc/self/task'))
    for _ in range(3):
        weights @ weights
    return len(os.listdir('/proc/self/task')) > before

class Party:  # what the batcher calls for a batch of one
    fill = [0, 0]

    def _run_layers(self, lo, hi, end):
        self.added = product_adds_threads()

def work():
    if sys.argv[1] == 'adopted':
        adopt_torch_threads()
    party.added = product_adds_threads()

party = Party()
if sys.argv[1] == 'batcher':
    Batcher(0.0).run(party, 0, 1, 1)
else:
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
print(party.added)
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenMP adds no worker on one core")
def test_threads_a_server_computes_in_keep_its_torch_thread_count():
    """`--threads 1` holds in every thread that computes: MKL in a fresh thread would otherwise run on every core.

    Each case in a fresh process (OpenMP's workers, once started, stay for the process), the three at once (each
    counts only its own threads), without the environment's own thread limits (with OMP_NUM_THREADS=1 no thread
    would add workers anyway)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cases = {case: subprocess.Popen([sys.executable, "-c", THREADS_SCRIPT, case], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for case in ("control", "adopted", "batcher")}
    added = {}
    try:
        for case, process in cases.items():
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err[-2000:]
            added[case] = out.split()[-1] == "True"
    finally:
        for process in cases.values():
            process.kill()  # none left behind where one failed (a no-op on those that ended)
    if not added["control"]:
        pytest.skip("here a fresh thread's product starts no OpenMP worker: nothing to guard against")
    assert not added["adopted"] and not added["batcher"], added
