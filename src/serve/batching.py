"""Cross-session batching on the cloud: the pending layer work of concurrent sessions runs together.

A decode step of one session reads every weight of the layers it runs to process one to a few
positions; eight sessions stepping at once read them eight times. Here the steps of the sessions
that are mid-generation run layer by layer together: for each layer index, the chunks of every
session that must run that layer now are packed into one row block, so the projections, the MLP
and the norms run once over all of them (one `run_layer` call: transformers' own decoder layer).
Attention runs per session, its queries against its own KV cache with its own mask (a registered
attention function that finds the packing of the current call in a thread-local). Each session
keeps its cuts, fill counts, stores and caches; only the arithmetic is shared. A session alone
runs exactly as without batching.

Packing changes the shape of the matrix products, so results may differ from a session's run
alone in the last bits (as chunking does): tokens are the same, logits within about 1e-5. A
replay after failover (src/link/grpc_link.py) therefore need not reproduce the replies bit for bit.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..base import Party
from ..kv_cache import GrowingLayer
from ..models import Chunk
from ..utils import adopt_torch_threads

logger = logging.getLogger(__name__)

PACKED_ATTENTION = "triadic_packed"


@dataclass
class Segment:
    """One session's rows in a packed layer call: rows [offset, offset + length) of the block."""

    cache: Cache  # that session's own transformers Cache
    offset: int
    length: int
    mask: torch.Tensor | None  # its own chunk's mask (transformers'), None where it needs none
    keys: torch.Tensor | None = None  # the session's whole keys/values for this layer, after the update
    values: torch.Tensor | None = None


class PackedCache:
    """Stands in for a Cache in one decoder-layer call over packed rows: each session's part goes to its own cache."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments
        self.lengths = [s.length for s in segments]  # the packed rows, split per session in one call
        self.returned: tuple[torch.Tensor, torch.Tensor] | None = None  # what `update` gave the layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = key_states.split(self.lengths, dim=2), value_states.split(self.lengths, dim=2)
        for s, k, v in zip(self.segments, keys, values):
            s.keys, s.values = s.cache.layers[layer_idx].update(k, v, *args, **kwargs)
        self.returned = key_states, value_states
        return key_states, value_states  # unused: packed_attention reads each segment's own keys and values


_current = threading.local()  # .packed: the PackedCache of the layer call this thread is running, if any


def packed_attention(module, query, key, value, attention_mask, **kwargs):
    """Each packed session's queries against its own cache with its own mask; outside a packed call, transformers' sdpa.

    This is the very call a session makes alone (transformers' sdpa over its chunk's queries, its
    cache after the update and its chunk's mask), once per session: the projections and the MLP are
    what batching shares. Attention reads each session's own keys in place; padding them into one
    block would copy every cache at every layer (and expand it per head where a mask is needed),
    which at 8 sessions cost more than the 8 calls. A decode step's single query without a mask is
    the commonest segment, and there transformers' dispatch (GQA checks, reshapes) costs as much as
    the attention itself: it gets the call transformers would make for it (`enable_gqa`) directly.
    """
    packed = getattr(_current, "packed", None)
    if packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if key is not packed.returned[0] or value is not packed.returned[1]:  # a family not declared unbatchable
        raise RuntimeError("this layer changed its keys or values after the cache update: its sessions cannot be batched")
    direct = kwargs.get("softcap") is None and kwargs.get("position_bias") is None and not kwargs.get("dropout")
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    outputs = []  # each [1, heads, rows, head dim]
    for s, rows in zip(packed.segments, query.split(packed.lengths, dim=2)):
        if direct and s.length == 1 and s.mask is None:
            outputs.append(F.scaled_dot_product_attention(rows, s.keys, s.values, scale=kwargs.get("scaling"), enable_gqa=gqa))
        else:
            outputs.append(sdpa_attention_forward(module, rows, s.keys, s.values, s.mask, **kwargs)[0].transpose(1, 2))
    return torch.cat(outputs, dim=2).transpose(1, 2), None  # [1, rows, heads, head dim], in the packed rows' order


ALL_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, packed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)


def why_not_batchable(part: torch.nn.Module) -> str | None:
    """Why the sessions of this part cannot be batched, or None where they can."""
    if part.config._attn_implementation not in ("sdpa", PACKED_ATTENTION):  # e.g. Gemma 2's soft-capped eager attention
        return f"batching packs sdpa attention, and this model uses {part.config._attn_implementation}"
    family = part.model.family
    if not family.batchable:
        return f"model type {part.config.model_type!r} changes its keys or values between its cache and attention"
    return None


def enable_packing(part: torch.nn.Module) -> None:
    """Switch a part's attention to `packed_attention` (identical to sdpa for unpacked calls)."""
    reason = why_not_batchable(part)
    if reason is not None:
        raise ValueError(reason)
    part.config._attn_implementation = PACKED_ATTENTION


@dataclass
class Job:
    """One session's pending layer work: bring layers lo .. hi-1 up to position `end`."""

    party: Party
    lo: int
    hi: int
    end: int
    error: BaseException | None = None  # set when this job failed; the others go on
    rows: int = 0  # the most positions one of its layers runs (`job_rows`): its share of a packed call
    evals: int = 0  # positions times layers it runs (`job_evals`): what it costs
    first: bool = False  # its session's first step (a new session's prompt): only sessions born a burst before step
    # between its batch's layers. A session started again on its stream is not new (START before each prompt held all).
    piecewise: bool = False  # a lagging layer catches up in several calls (`Party.segments`): but for a decode step's few,
    # it runs with the long steps
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Packing:
    """The packed rows of one layer call, kept while the next layer runs the same rows of the same sessions."""

    key: tuple
    jobs: list[Job]
    output: torch.Tensor  # [rows, hidden]: the output of layer `layer - 1`, i.e. h_layer
    layer: int
    offsets: list[tuple[int, int, int]]  # per job: (first position, offset, length)

    def store(self) -> None:
        """Write each session's rows of h_layer to its own store (what `Party._run_layers` does per layer)."""
        for job, (start, offset, length) in zip(self.jobs, self.offsets):
            if job.error is None:
                job.party.store.put(self.layer, start, self.output[offset : offset + length])


def run_layers_together(jobs: Sequence[Job], between: Callable[[], None] | None = None) -> int:
    """Bring each job's layers lo .. hi-1 up to its `end`, one layer call per index for all jobs.

    Jobs are of distinct sessions over the same part (shared weights). Layers run in increasing
    index, so every session's input to layer i exists when layer i runs. While consecutive layers
    run the same rows of the same sessions (the common case: every layer between the cuts), the
    packed output of one layer is the next one's input as is, and the packing (positions, rotary,
    masks) is reused: no per-session work per layer beyond its cache update. A session that catches
    a lagging layer up step by step where a chunk would change its bits (`Party.segments`: lossless
    in bf16 or fp16) runs that layer alone, as it would unbatched. A job whose
    `party.on_layer` raises (cancelled, past its deadline) drops out with that error; a failing
    packed call is rolled back and its jobs finish one by one, so one bad session fails only itself.
    `between`, where given, is called between two layer indices (the batcher runs decode steps there); a job alone
    then runs a layer at a time too, keeping only the states its next layers need, as a long step does.
    Returns the number of layer calls made (for a batch of one, the layers its range spans).
    """
    if len(jobs) == 1 and between is None:  # alone: exactly its own run, one call (the store is not written layer by layer)
        _run_whole(jobs[0])
        return jobs[0].hi - jobs[0].lo
    calls = 0
    carried: _Packing | None = None
    packings: dict[tuple, tuple[Chunk, PackedCache]] = {}
    try:
        first = min(job.lo for job in jobs)
        for index in range(first, max(job.hi for job in jobs)):
            if between is not None and index > first:
                between()  # other sessions' steps, between two layer calls of these (whose states stay where they are)
            members = _members(jobs, index)
            stepwise = [job for job in members if job.party.segment_end(job.party.fill[index], job.end) < job.end]
            members = [job for job in members if job not in stepwise]
            key = tuple((id(job.party), job.party.fill[index], job.end) for job in members)
            if carried is not None and (carried.key != key or any(index in job.party.send_cuts for job in carried.jobs)):
                carried.store()  # the next layer reads other rows, or the store must keep h_index (a cut it sends)
            for job in stepwise:  # its pieces as HF ran them, each a call of its own (after the store holds its input)
                calls += 1
                _run_one_layer(job, index)
            if not members:
                carried = None
                continue
            calls += 1
            if len(members) == 1:
                carried = None
                _run_one_layer(members[0], index)
                if len(jobs) == 1:  # a layer at a time: drop what no later layer needs
                    members[0].party.prune()
                continue
            model = members[0].party.layer_owner[index]
            if any(job.party.layer_owner[index] is not model for job in members):
                raise RuntimeError("internal: batched sessions must share one part")
            packing_key = (model.layer_types[index], key)
            if carried is not None and carried.key == key:
                rows = carried.output
            else:
                rows = torch.cat([job.party.store.get(index, job.party.fill[index], job.end) for job in members])
            if packing_key not in packings:
                packings[packing_key] = _pack(model, members, rows, index)
            chunk, packed = packings[packing_key]
            offsets = [(job.party.fill[index], s.offset, s.length) for job, s in zip(members, packed.segments)]
            _current.packed = packed
            try:
                output = model.run_layer(index, rows.unsqueeze(0), chunk, packed)[0]
            except BaseException:
                _roll_back(members, index)
                raise
            finally:
                _current.packed = None
            for job, (_, _, length) in zip(members, offsets):
                job.party.layer_evals += length
                job.party.fill[index] = job.end
            carried = _Packing(key, members, output, index + 1, offsets)
    except Exception as error:  # a packed call failed: its sessions' caches are as before it; finish each job alone
        logger.warning("a batched layer call failed (%s: %s); running its sessions one by one", type(error).__name__, error)
        if carried is not None:
            carried.store()
        for job in jobs:
            if job.error is None:
                _run_whole(job)
        return calls
    if carried is not None:
        carried.store()
    return calls


def _members(jobs: Sequence[Job], index: int) -> list[Job]:
    """The jobs that run layer `index` now: in their range, behind their end, and not stopped by their
    session's check (`party.on_layer`, run here once per layer; a job it stops keeps the error)."""
    members = []
    for job in jobs:
        if job.error is None and job.lo <= index < job.hi and job.party.fill[index] < job.end:
            if job.party.on_layer is not None:
                try:
                    job.party.on_layer()
                except BaseException as error:  # noqa: BLE001 (handed to that session's thread)
                    job.error = error
                    continue
            members.append(job)
    return members


def _run_one_layer(job: Job, index: int) -> None:
    """Layer `index` of one session on its own (its check ran in `_members`, so not again)."""
    on_layer, job.party.on_layer = job.party.on_layer, None
    try:
        job.party._run_layers(index, index + 1, job.end)
    except BaseException as error:  # noqa: BLE001 (handed to that session's thread)
        job.error = error
    finally:
        job.party.on_layer = on_layer


def _run_whole(job: Job) -> None:
    """A job's whole range as the session would run it alone; an error is kept for that session's thread."""
    try:
        job.party._run_layers(job.lo, job.hi, job.end)
    except BaseException as error:  # noqa: BLE001 (handed to that session's thread)
        job.error = error


def _pack(model, members: list[Job], rows: torch.Tensor, index: int) -> tuple[Chunk, PackedCache]:
    """One chunk over all members' rows (each with its own positions) and the per-session attention layout."""
    positions, cos, sin, segments, offset = [], [], [], [], 0
    for job in members:
        party, start = job.party, job.party.fill[index]
        own = party._chunk(model, rows[offset : offset + job.end - start].unsqueeze(0), start, job.end, index)
        segments.append(Segment(party.cache, offset, job.end - start, own.mask))
        positions.append(own.position_ids)
        cos.append(own.position_embeddings[0])
        sin.append(own.position_embeddings[1])
        offset += job.end - start
    chunk = Chunk(0, offset, torch.cat(positions, dim=1), (torch.cat(cos, dim=1), torch.cat(sin, dim=1)), None)
    return chunk, PackedCache(segments)


def _roll_back(members: list[Job], index: int) -> None:
    """Undo a failed packed call's cache appends at layer `index`, so each session can run it again alone."""
    for job in members:
        layer = job.party.cache.layers[index]
        if not layer.is_initialized:
            continue
        if not isinstance(layer, GrowingLayer):  # a sliding window's layer cannot be cut back: that session fails
            job.error = RuntimeError("a batched layer call failed and this session's cache cannot be rolled back")
        elif layer.length > job.party.fill[index]:
            layer.crop(job.party.fill[index] - layer.length)


SMALL_ROWS = 8  # a step of at most this many rows per layer (a decode step, its catch-ups) always joins the next batch
FAST_ROWS = 64  # a batch of more rows per layer than this (prompts) runs its decode steps first, on their own


def job_rows(job: Job) -> int:
    """The most positions one of the job's layers runs: its share of a packed call's rows."""
    return max((job.end - fill for fill in job.party.fill[job.lo : job.hi]), default=0)


def job_evals(job: Job) -> int:
    """Positions times layers: what a job costs."""
    return sum(max(0, job.end - fill) for fill in job.party.fill[job.lo : job.hi])


def is_light(job: Job) -> bool:
    """At most SMALL_ROWS rows per layer on average: a decode step, its catch-ups included. Its `rows` may be a
    prompt's (a layer that lagged behind the cut since the prefill catches the whole prompt up), but that is one
    layer's worth; a prompt is not light."""
    return job.evals <= SMALL_ROWS * (job.hi - job.lo)


def job_is_piecewise(job: Job) -> bool:
    """Whether a layer of the job runs in several calls: its longest range does (`Party.segments` cuts a shorter range
    of the same end in no more pieces)."""
    return job.rows > 1 and job.party.segment_end(job.end - job.rows, job.end) < job.end


class Batcher:
    """Collects the layer work of concurrent sessions and runs it together on one worker thread.

    Window policy: the first step to arrive waits at most `window` seconds for the others; the batch
    runs as soon as every session that is mid-generation and keeps pace has joined, i.e. every session
    that sent a step within the last `horizon` seconds, or started (`expect`) within the last window,
    has not been `forget`-ten (its stream ended), and sent its last step within a window of getting
    its previous reply. Edges that got their replies together come back at about the same time, so the
    sessions stay in step. A session that takes longer than a window to come back (a slow edge, a long
    round trip, a client stepping once a second) is not waited for: its steps join whatever batch comes
    next. (Waited for, one session stepping once a second held every other session's step for a whole
    window: 24-29 ms steps took 124-131 ms.) Waiting costs no CPU, only latency, at most `window` per step.

    Size policy: a batch is the step waiting longest, every pending decode step (`is_light`: at most
    SMALL_ROWS rows per layer, its catch-ups included), and the others smallest first while the batch holds
    at most `max_rows` rows; the rest run in the next batch, without waiting again. A step with more rows
    than that (a long prompt), or one whose lagging layers catch up in many calls (`Party.segments`), runs
    one call at a time between batches, one call of one such step per batch, in turn: a long prefill
    holding every other session's steps back for its whole length (3 s at 1,024 positions here, 10 s per
    layer for a lossless bf16 catch-up of 4,000 positions) was a way for one client within its limits to
    stall the rest. A call at a time gives the same bits as a run of the whole range, and its session
    keeps only the states its next layers need.

    Prompts before decode steps: where a batch holds prompts (more than FAST_ROWS rows per layer), its decode
    steps run first, on their own, and those that arrive while the prompts run go between two of their layer
    calls (`_between`); beside a new session's first step, only if born a burst before it. So a decode step
    waits for a window, a layer call and one call of a long step, not for other sessions' prompts (beside
    clients looping prompts of the cap's 128 rows it waited 0.76 s; now 0.06 s); in a burst of new sessions
    it waits with the others, and the sessions stay in step.
    """

    def __init__(self, window: float, horizon: float = 2.0, max_batch: int = 64, max_rows: int = 128,
                 burst: float = 0.5) -> None:
        self.window = window  # seconds a step may wait for other sessions' steps
        self.horizon = horizon  # a session not seen for this long is no longer waited for
        self.burst = burst  # sessions born (first step) this close together are one burst: they wait for each other's
        # prompts (16 edges starting together here were born within 0.34 s)
        self.max_batch = max_batch  # steps per batch at most
        self.max_rows = max_rows  # rows per batch at most, decode steps aside; a longer step runs a call at a time between batches
        self._pending: list[Job] = []
        self._long: list[tuple[Job, int]] = []  # long steps under way and the layer each runs next (the worker's alone)
        self._left_over = False  # the last batch left pending steps behind: the next one runs without waiting
        self._seen: dict[int, float] = {}  # id(party) -> when it last sent a step
        self._light: dict[int, bool] = {}  # id(party) -> whether its last step was a decode step (`is_light`)
        self._born: dict[int, float] = {}  # id(party) -> when its first step arrived (sessions of a burst are born together)
        self._replied: dict[int, float] = {}  # id(party) -> when its last step's layers were done
        self._late: set[int] = set()  # sessions whose last step came more than a window after their previous reply
        self._started: set[int] = set()  # sessions `expect`-ed that have not stepped since: not waited for again
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self.batches = 0  # counters, for tests and stats
        self.steps = 0
        self.largest = 0
        self.between = 0  # batches of decode steps run between two layer calls of a prompt batch

    def run(self, party: Party, lo: int, hi: int, end: int) -> None:
        """Called from a session's thread in place of party._run_layers: returns once its layers ran."""
        job = Job(party, lo, hi, end)
        job.rows, job.evals = job_rows(job), job_evals(job)
        job.piecewise = job_is_piecewise(job)
        with self._cond:
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="cloud-batcher", daemon=True)
                self._worker.start()
            job.first = id(party) not in self._born
            self._born.setdefault(id(party), job.arrived)
            if job.arrived - self._replied.get(id(party), job.arrived) > self.window:
                self._late.add(id(party))
            else:
                self._late.discard(id(party))
            self._light[id(party)] = is_light(job)
            self._pending.append(job)
            self._seen[id(party)] = job.arrived
            self._started.discard(id(party))
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error

    def stats(self) -> dict:
        """For the server's Stats: the window and how full the batches were."""
        return {"window_ms": 1e3 * self.window, "batches": self.batches, "steps": self.steps, "largest": self.largest,
                "between": self.between}

    def expect(self, party: Party) -> None:
        """A session started: steps wait for its first one too (a burst of new sessions runs its prefills together).

        Only for one window: a START costs the client no computation, so a client that starts sessions
        and never steps holds the others' steps back by at most one window per session, not for the horizon.
        A session that starts again before it stepped is not waited for again (STARTs repeated every few
        milliseconds held every step of the others back by a whole window).
        """
        with self._cond:
            if id(party) not in self._started:
                self._started.add(id(party))
                armed = time.monotonic() - self.horizon + min(self.window, self.horizon)  # seen as if a step came then
                self._seen[id(party)] = max(self._seen.get(id(party), armed), armed)  # a later step stands

    def forget(self, party: Party) -> None:
        """The session ended: no batch waits for it any more."""
        with self._cond:
            self._seen.pop(id(party), None)
            self._light.pop(id(party), None)
            self._born.pop(id(party), None)
            self._replied.pop(id(party), None)
            self._late.discard(id(party))
            self._started.discard(id(party))
            self._cond.notify_all()

    def expected(self) -> int:
        """Sessions mid-generation: seen within the horizon (call with the lock held)."""
        now = time.monotonic()
        for key in [k for k, seen in self._seen.items() if now - seen > self.horizon]:
            del self._seen[key]
        return len(self._seen)

    def _awaited(self) -> int:
        """Sessions a batch waits for (call with the lock held): mid-generation (`expected`), keeping pace (not late),
        and without a step pending."""
        self.expected()
        pending = {id(job.party) for job in self._pending}
        return sum(1 for key in self._seen if key not in pending and key not in self._late)

    def _loop(self) -> None:
        adopt_torch_threads()
        while True:
            with self._cond:
                while not self._pending and not self._long:
                    self._cond.wait()
                # From the later of the first step's arrival and now: steps that queued while the last batch
                # ran wait for that batch's sessions too, so the sessions fall into step instead of alternating.
                # Not while a long step is under way (its session sends nothing meanwhile, and its layers wait),
                # nor for steps a full batch left behind (they waited their turn already).
                deadline = max(self._pending[0].arrived if self._pending else 0.0, time.monotonic() - 1e-3) + self.window
                while not (self._long or self._left_over) and len(self._pending) < self.max_batch and self._awaited():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._take()
            if batch:
                self._run(batch)
            if self._long:
                self._run_long_call()

    def _take(self) -> list[Job]:
        """The next batch (call with the lock held), up to `max_batch` steps: the step pending longest, every decode
        step (`is_light`), then the others smallest first while the rows stay within `max_rows`; a step longer than
        `max_rows`, or piecewise beyond a decode step's few calls, goes to the long steps instead."""
        for job in [job for job in self._pending if self._is_long(job)]:
            self._long.append((job, job.lo))
        waiting = [job for job in self._pending if not self._is_long(job)]
        batch: list[Job] = []
        rest: list[Job] = []
        rows = 0
        for job in waiting[:1] + sorted(waiting[1:], key=lambda job: job.rows):  # sorted() keeps arrival order among equals
            if len(batch) < self.max_batch and (job is waiting[0] or is_light(job) or rows + job.rows <= self.max_rows):
                batch.append(job)
                rows += job.rows
            else:
                rest.append(job)
        self._pending = sorted(rest, key=lambda job: job.arrived)
        self._left_over = bool(rest)
        return batch

    def _is_long(self, job: Job) -> bool:
        """Whether the step runs a call at a time between batches: longer than `max_rows`, or piecewise beyond a
        decode step's few calls."""
        return job.rows > self.max_rows or (job.piecewise and not is_light(job))

    def _run_long_call(self) -> None:
        """One call of the long step whose turn it is: its layer's next piece (`Party.segments`; the whole chunk but
        where a lagging layer catches up step by step), as its session's own run of that layer makes it, checks
        included."""
        job, index = self._long.pop(0)
        party = job.party
        try:
            with torch.inference_mode():  # as every entry point (Party)
                start = party.fill[index]
                if start < job.end:
                    party._run_layers(index, index + 1, party.segment_end(start, job.end))  # not segments(): O(positions) a call
                if party.fill[index] >= job.end and index + 1 < job.hi:  # its output is stored for the next layer:
                    party.prune()  # drop what no later layer needs
        except BaseException as error:  # noqa: BLE001 (handed to that session's thread)
            job.error = error
        if job.error is None and (party.fill[index] < job.end or index + 1 < job.hi):
            self._long.append((job, index if party.fill[index] < job.end else index + 1))
            return
        self._count([job])
        job.done.set()

    def _run(self, batch: list[Job]) -> None:
        # A batch of prompts (more than FAST_ROWS rows per layer) runs its decode steps first, as a batch of their own
        # (they cost a few rows a layer, the prompts up to `max_rows`), and then lets later ones in between its layer
        # calls. Beside clients looping prompts of the cap's 128 rows, an honest step (26 ms alone) waited for the batch
        # under way and then ran beside the next prompt: 0.76 s.
        between = None
        if sum(job.evals for job in batch) > FAST_ROWS * (max(job.hi for job in batch) - min(job.lo for job in batch)):
            prompts = [job for job in batch if not is_light(job)]
            if prompts:  # not for a heavy batch of decode steps alone
                if len(prompts) < len(batch):
                    self._run([job for job in batch if is_light(job)])
                    batch = prompts
                between = functools.partial(self._between, batch, [0.0])
        try:
            with torch.inference_mode():  # as every entry point (Party)
                run_layers_together(batch, between)
        except BaseException as error:  # noqa: BLE001 (every waiting session hears of it; the worker goes on)
            logger.exception("batched layer run failed")
            for job in batch:
                job.error = job.error or error
        self._count(batch)
        for job in batch:
            job.done.set()

    def _between(self, batch: list[Job], turn: list[float]) -> None:
        """Between two layer calls of a prompt batch: the decode steps pending run now, as a batch of their own, once
        every other session decoding has sent one or the oldest has waited a window, and once the batch under way has
        run for as long as the last such batch took (from `turn[0]`).

        So a decode step beside another session's prompt (a new turn, or a client looping prompts) waits for at most
        a window and a layer call, not the prompt batch. While a new session's first step is pending or under way,
        only sessions born `burst` seconds before it step: after a burst of new sessions, the first to finish their prompts
        would step during the later prompts and fall out of step with them (8 edges' batches held 5.6-6.0 steps instead
        of 6.7-6.9), but a session decoding long before is no part of that burst (a client opening a stream for each
        prompt held every other session's steps back for its prompts: 0.4 s). And not without the turn: sessions
        stepping without pause would hold a prompt to a layer per step of theirs. The sessions are distinct (a session
        has one step pending at most), so neither batch touches the other's states."""
        if time.monotonic() < turn[0]:
            return
        with self._cond:
            news = [job.arrived for job in batch if job.first] + [
                job.arrived for job in self._pending if job.first and not is_light(job)]
            born_before = min(news) - self.burst if news else float("inf")  # a burst's sessions wait for it

            def settled(key: int) -> bool:
                return self._born.get(key, born_before) < born_before

            steps = [job for job in self._pending
                     if is_light(job) and not self._is_long(job) and settled(id(job.party))][: self.max_batch]
            if not steps:
                return
            self.expected()  # drops the sessions not seen within the horizon
            others = sum(self._light.get(key, False) and settled(key) and key not in self._late  # decoding, not a prompt's,
                         for key in self._seen)  # and keeping pace
            if len(steps) < others and time.monotonic() - steps[0].arrived < self.window:
                return
            chosen = {id(job) for job in steps}
            self._pending = [job for job in self._pending if id(job) not in chosen]
            self.between += 1
        began = time.monotonic()
        self._run(steps)
        turn[0] = 2 * time.monotonic() - began

    def _count(self, batch: list[Job]) -> None:
        """Count a finished batch, and note when its sessions got their replies (what their next steps' pace is from)."""
        now = time.monotonic()
        with self._cond:
            for job in batch:
                if id(job.party) in self._seen:  # not for a session already forgotten
                    self._replied[id(job.party)] = now
        self.batches += 1
        self.steps += len(batch)
        self.largest = max(self.largest, len(batch))
