"""Cross-session batching on the cloud: the pending layer work of concurrent sessions runs together.

A decode step of one session reads every weight of the layers it runs to process one to a few
positions; eight sessions stepping at once read them eight times. Here the steps that arrive within
a short window run layer by layer together: for each layer index, the chunks of every session that
must run that layer now are packed into one row block, so the projections, the MLP and the norms
run once over all of them (one `run_layer` call: transformers' own decoder layer), while attention
runs per session against that session's own KV cache with its own mask (transformers' own sdpa
attention, called once per session through a registered attention function that finds the
packing of the current call in a thread-local). Each session keeps
its cuts, fill counts, stores and caches; only the arithmetic is shared.

Packing changes the shape of the matrix products, so results may differ from a session's run
alone in the last bits (as chunking does): tokens are the same, logits within about 1e-5.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .base import Party
from .models import Chunk

logger = logging.getLogger(__name__)

PACKED_ATTENTION = "triadic_packed"


@dataclass
class Segment:
    """One session's rows in a packed layer call: rows [offset, offset + length) of the block."""

    cache: object  # that session's own transformers Cache
    offset: int
    length: int
    mask: torch.Tensor | None
    keys: torch.Tensor | None = None  # the session's whole keys/values for this layer, after the update
    values: torch.Tensor | None = None


@dataclass
class PackedCache:
    """Stands in for a Cache in one decoder-layer call over packed rows: each session's part goes to its own cache."""

    segments: list[Segment]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        for s in self.segments:
            rows = slice(s.offset, s.offset + s.length)
            s.keys, s.values = s.cache.update(key_states[:, :, rows], value_states[:, :, rows], layer_idx, *args, **kwargs)
        return key_states, value_states  # unused: packed_attention reads each segment's own keys and values


_current = threading.local()  # .packed: the PackedCache of the layer call this thread is running, if any


def packed_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa per session over its own cache; outside a packed call, exactly transformers' sdpa attention."""
    packed = getattr(_current, "packed", None)
    if packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for s in packed.segments:
        out, _ = sdpa_attention_forward(module, query[:, :, s.offset : s.offset + s.length], s.keys, s.values, s.mask, **kwargs)
        outputs.append(out)  # [1, length, heads, head_dim]
    return torch.cat(outputs, dim=1), None


ALL_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, packed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)


def enable_packing(part: torch.nn.Module) -> None:
    """Switch a part's attention to `packed_attention` (identical to sdpa for unpacked calls)."""
    if part.config._attn_implementation not in ("sdpa", PACKED_ATTENTION):
        raise ValueError(f"batching needs sdpa attention, not {part.config._attn_implementation}")
    part.config._attn_implementation = PACKED_ATTENTION


def run_layers_together(jobs: Sequence[tuple[Party, int, int, int]]) -> int:
    """Bring each job's layers lo .. hi-1 up to its `end`, one layer call per index for all jobs.

    Jobs are (party, lo, hi, end) of distinct sessions over the same part (shared weights). Layers
    run in increasing index, so every session's input to layer i exists when layer i runs. Returns
    the number of layer calls made.
    """
    calls = 0
    for index in range(min(lo for _, lo, _, _ in jobs), max(hi for _, _, hi, _ in jobs)):
        members = [(party, end) for party, lo, hi, end in jobs if lo <= index < hi and party.fill[index] < end]
        if not members:
            continue
        calls += 1
        if len(members) == 1:
            party, end = members[0]
            party._run_layers(index, index + 1, end)
            continue
        model = members[0][0].layer_owner[index]
        rows, positions, cos, sin, segments, offset = [], [], [], [], [], 0
        for party, end in members:
            if party.layer_owner[index] is not model:
                raise RuntimeError("internal: batched sessions must share one part")
            start = party.fill[index]
            states = party.store.get(index, start, end)
            chunk = party._chunk(model, states.unsqueeze(0), start, end, index)
            segments.append(Segment(party.cache, offset, end - start, chunk.mask))
            rows.append(states)
            positions.append(chunk.position_ids)
            cos.append(chunk.position_embeddings[0])
            sin.append(chunk.position_embeddings[1])
            offset += end - start
        # One chunk over all rows, each with its own position; the masks are per session, in the segments.
        chunk = Chunk(0, offset, torch.cat(positions, dim=1), (torch.cat(cos, dim=1), torch.cat(sin, dim=1)), None)
        packed = _current.packed = PackedCache(segments)
        try:
            output = model.run_layer(index, torch.cat(rows).unsqueeze(0), chunk, packed)[0]
        finally:
            _current.packed = None
        for (party, end), s in zip(members, segments):
            party.store.put(index + 1, party.fill[index], output[s.offset : s.offset + s.length])
            party.layer_evals += s.length
            party.fill[index] = end
    return calls


@dataclass
class _Job:
    party: Party
    lo: int
    hi: int
    end: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Batcher:
    """Collects the layer work of concurrent sessions and runs it together on one worker thread.

    A step waits at most `window` seconds for others to join (less once every active session has
    joined), then the batch runs. `active()` tells how many sessions may join (e.g. open sessions).
    """

    def __init__(self, window: float, active: Callable[[], int], max_batch: int = 64) -> None:
        self.window = window  # seconds a step may wait for other sessions' steps
        self.active = active
        self.max_batch = max_batch  # steps per batch at most
        self._pending: list[_Job] = []
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        self.batches = 0  # counters, for tests and stats
        self.steps = 0
        self.largest = 0

    def run(self, party: Party, lo: int, hi: int, end: int) -> None:
        """Called from a session's thread in place of party._run_layers: returns once its layers ran."""
        job = _Job(party, lo, hi, end)
        with self._cond:
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="cloud-batcher", daemon=True)
                self._worker.start()
            self._pending.append(job)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                deadline = time.monotonic() + self.window
                while len(self._pending) < min(max(1, self.active()), self.max_batch):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        try:
            with torch.inference_mode():
                run_layers_together([(job.party, job.lo, job.hi, job.end) for job in batch])
        except BaseException as error:  # every waiting session hears of it; the worker goes on
            logger.exception("batched layer run failed")
            for job in batch:
                job.error = error
        self.batches += 1
        self.steps += len(batch)
        self.largest = max(self.largest, len(batch))
        for job in batch:
            job.done.set()
