"""What Edge and Cloud have in common: per-layer KV caches that may lag behind, and how to fill them.

Each side holds some decoder layers (global indices). For every layer i it owns it keeps
`fill[i]`: positions 0 .. fill[i]-1 are in that layer's KV cache. When the cuts move, a layer may
lag behind the sequence; running it "up to position n" means running positions fill[i] .. n-1 as
one chunk. The inputs of that chunk come from `store`: h_i(s), the hidden state entering layer i
at position s, which the side either computed itself (as the output of layer i-1) or received.

A side also mirrors the other side's fill counts, advanced from the shared schedule, so it knows
which positions to put in a message (those the receiver lacks at the cut) without a round trip.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from .kv_cache import growing_cache
from .link.codec import Codec
from .models import Chunk, SplitLlamaForCausalLM, SplitLlamaModel
from .precision import dtype_name
from .schedule import SplitSchedule
from .utils import ProtocolError

if TYPE_CHECKING:
    from .serve.batching import Batcher


class _Run:
    """One layer's stored positions [begin, end): rows of a buffer with spare room, so appends do not copy the run."""

    def __init__(self, start: int, states: torch.Tensor) -> None:
        # The states themselves, not a copy: most runs are read once and dropped. The first write
        # moves them into a buffer of the run's own (never writing into the caller's tensor).
        self.buffer, self.borrowed = states, True
        self.base = self.begin = start  # `base`: the position of buffer row 0
        self.end = start + len(states)

    def write(self, start: int, states: torch.Tensor) -> None:
        """Write positions that touch or overlap the run (they replace what is there), growing it as needed."""
        begin, end = min(self.begin, start), max(self.end, start + len(states))
        if self.borrowed or begin < self.base or end - self.base > len(self.buffer) or states.dtype != self.buffer.dtype:
            grown = states.new_empty(max(16, 2 * (end - begin)), states.shape[-1])
            grown[self.begin - begin : self.end - begin] = self.buffer[self.begin - self.base : self.end - self.base]
            self.buffer, self.base, self.borrowed = grown, begin, False
        self.buffer[start - self.base : start - self.base + len(states)] = states
        self.begin, self.end = begin, end

    def view(self, start: int, end: int) -> torch.Tensor:
        return self.buffer[start - self.base : end - self.base]


class HiddenStore:
    """h_j(s) for the layers and positions a future step may still need, one contiguous run per layer.

    Each run lives in a buffer with spare room (as kv_cache.GrowingLayer): appending a step's
    position writes one row instead of concatenating the whole run, and dropping old positions
    moves a start index. `get` returns a view, valid until the next `put` to the same layer.
    """

    def __init__(self) -> None:
        self.runs: dict[int, _Run] = {}

    def put(self, layer: int, start: int, states: torch.Tensor) -> None:
        """Write positions start .. start+len-1, merging with what is stored when the runs touch."""
        run = self.runs.get(layer)
        if run is not None and run.begin <= start + len(states) and start <= run.end:
            run.write(start, states)
        else:
            self.runs[layer] = _Run(start, states)

    def get(self, layer: int, start: int, end: int) -> torch.Tensor:
        run = self.runs.get(layer)
        if run is None or start < run.begin or end > run.end:
            held = "nothing" if run is None else f"{run.begin}..{run.end - 1}"
            raise RuntimeError(f"internal: h_{layer} at {start}..{end - 1} is needed but the store holds {held}")
        return run.view(start, end)

    def keep_from(self, layer: int, position: int | None) -> None:
        """Drop positions before `position`; None drops the layer entirely."""
        run = self.runs.get(layer)
        if run is None:
            return
        if position is None or position >= run.end:
            del self.runs[layer]
        elif position > run.begin:
            run.begin = position

    def truncate(self, end: int) -> None:
        """Forget every position from `end` on (the sequence was cut back there)."""
        for layer in list(self.runs):
            run = self.runs[layer]
            if run.begin >= end:
                del self.runs[layer]
            elif run.end > end:
                run.end = end

    def num_positions(self) -> int:
        return sum(run.end - run.begin for run in self.runs.values())

    def held(self) -> dict[int, tuple[int, torch.Tensor]]:
        """What is stored: layer -> (first position, states), for inspection and tests."""
        return {layer: (run.begin, run.view(run.begin, run.end)) for layer, run in self.runs.items()}


class Party:
    """One side of the split: its layers, its KV caches, its store, and a mirror of the peer's fill counts.

    Every entry point that runs layers (Edge.generate / continue_with, Cloud.handle, the cloud's batcher)
    runs under `torch.inference_mode()`, not just `no_grad()`: no autograd bookkeeping at all, which cuts
    the host's cost of every tensor operation by about a tenth, and that cost is what bounds a decode
    step on a GPU. Caches made there are inference tensors, so all steps must run there: they do.
    """

    # Called before each layer runs; it may raise to stop the computation (`utils.StopSignal.check`,
    # from either server). The caches are then mid-step: the session must be dropped.
    on_layer: Callable[[], None] | None = None
    role: str  # "edge" or "cloud": named in what this side says about its peer's messages

    def __init__(
        self,
        schedule: SplitSchedule,
        parts: Iterable[SplitLlamaForCausalLM],
        send_cuts: Iterable[int],
        peer_layers: Iterable[int],
    ):
        self.schedule = schedule
        self.parts = list(parts)
        self.layer_owner: dict[int, SplitLlamaModel] = {}
        for part in self.parts:
            for index in part.model.owned_layers:
                self.layer_owner[index] = part.model
        self.config = self.parts[0].config
        self.num_layers = self.config.num_hidden_layers
        self.send_cuts = frozenset(send_cuts)  # layers whose input this side sends to the peer
        self.peer_layers = frozenset(peer_layers)
        # Per cut, the channel weights a lossy link quantizes with (src/families.py, `link_gain_offset`).
        self.link_gains: dict[int, torch.Tensor] = {c: g for part in self.parts for c, g in getattr(part, "link_gains", {}).items()}
        self.least_gains = {c: float(g.min()) for c, g in self.link_gains.items()}  # what `unweigh` divides by at most
        # The compute dtype: int8 weights (--load-in-8bit) do not count, the norms' weights do.
        reference = next(p for part in self.parts for p in part.parameters() if p.is_floating_point())
        self.device, self.dtype = reference.device, reference.dtype
        self.layer_evals = 0
        self.peak_stored = 0
        self.batcher: Batcher | None = None  # a cloud serving many sessions runs their layer work together (src/serve/batching.py)
        # Whether a lagging layer catches up step by step (as HF generate ran those positions) instead of
        # in one chunk: set per side from its link's codec and its dtype (`use_step_catch_up`).
        self.catch_up_by_step = False
        self.reset()

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - began

    def reset(self) -> None:
        """Forget the sequence: a new session starts from empty caches and timers."""
        self.seconds: defaultdict[str, float] = defaultdict(float)  # where this session's time goes: compute, encode, decode
        self.cache = growing_cache(self.config)
        self.fill = [0] * (self.num_layers + 1)
        self.peer_fill = [0] * (self.num_layers + 1)
        self.store = HiddenStore()
        self.end = 0  # positions 0 .. end-1 have been processed by the pipeline
        self._chunks: dict[tuple[int, str], Chunk] = {}  # this step's chunks by (start, layer type), all ending at `_chunks_end`
        self._rotary: dict[str, tuple] = {}  # this step's rotary range by layer type where the family has one per type: (first position, ids, (cos, sin))
        self._chunks_end = -1
        self.prefills: list[tuple[int, int]] = []  # (first, end) of each request's first step: one chunk in HF too

    def truncate(self, length: int) -> None:
        """Cut the sequence back to positions 0 .. length-1: caches, fill counts, the peer's mirror, the store.

        Both sides do this on the same TURN message, so the mirrors stay exact without a round trip.
        """
        for index in self.layer_owner:
            extra = self.fill[index] - length
            if extra > 0:
                self.cache.layers[index].crop(-extra)
                self.fill[index] = length
        self.peer_fill = [min(fill, length) for fill in self.peer_fill]
        self.store.truncate(length)
        self.prefills = [(first, min(end, length)) for first, end in self.prefills if first < length]
        self.end = min(self.end, length)
        self._chunks_end = -1

    def use_step_catch_up(self, codec: Codec) -> None:
        """Catch lagging layers up step by step where it decides exactness: over a lossless link, in bf16 or fp16.

        A layer that lags (the cuts moved) runs its missing positions in one chunk: one weight read, but
        the chunk's products add in another order than HF's one-position steps. In fp32 that shows in
        the last bits only (logits within 1e-5); in bf16/fp16 it moves logits by up to about one unit and
        can flip near-tied tokens. So with `--codec none` and a 16-bit dtype, a lagging layer replays the
        steps HF ran: the request's prefill as one chunk, then one position per call. Bit-identical to
        HF generate, at the cost of more layer calls where the cuts move. Lossy codecs keep the chunks.
        """
        self.catch_up_by_step = codec.lossless and self.dtype not in (torch.float32, torch.float64)

    def segments(self, start: int, end: int) -> list[tuple[int, int]]:
        """[start, end) cut where HF generate's steps cut it: a request's prefill whole, then single positions."""
        pieces, position = [], start
        while position < end:
            pieces.append((position, self.segment_end(position, end)))
            position = pieces[-1][1]
        return pieces or [(start, end)]

    def segment_end(self, position: int, end: int) -> int:
        """Where the piece of `segments` that starts at `position` ends (the first piece, without cutting the rest)."""
        if not self.catch_up_by_step:
            return end
        for first, last in self.prefills:
            if first <= position < last:
                return min(last, end)
        return position + 1

    def run_layers(self, lo: int, hi: int, end: int) -> None:
        """Bring layers lo .. hi-1 up to position `end`, each from its own fill count."""
        with self.timed("compute"):
            if self.batcher is not None and lo < hi:
                self.batcher.run(self, lo, hi, end)
            else:
                self._run_layers(lo, hi, end)

    def _run_layers(self, lo: int, hi: int, end: int) -> None:
        # A layer's output goes straight into the next layer when that layer runs the same chunk; it
        # is stored only where it is needed later: at `hi`, where the next layer lags behind (its chunk
        # starts earlier), and at cuts this side sends from.
        carried: tuple[int, torch.Tensor] | None = None  # (start, h_index over start .. end-1), not stored
        for index in range(lo, hi):
            start = self.fill[index]
            if carried is not None and (carried[0] != start or index in self.send_cuts):
                self.store.put(index, carried[0], carried[1][0])
                carried = None
            if start >= end:
                continue
            if self.on_layer is not None:
                self.on_layer()
            model = self.layer_owner[index]
            states = carried[1] if carried is not None else self.store.get(index, start, end).unsqueeze(0)
            pieces = self.segments(start, end)
            if len(pieces) == 1:
                output = model.run_layer(index, states, self._chunk(model, states, start, end, index), self.cache)
            else:  # as HF ran them (use_step_catch_up): the earlier pieces' chunks are not shared, the last one is
                outputs = []
                for first, stop in pieces:
                    piece = states[:, first - start : stop - start]
                    chunk = self._chunk(model, piece, first, end, index) if stop == end else model.make_chunk(piece, first, self.cache, index)
                    outputs.append(model.run_layer(index, piece, chunk, self.cache))
                output = torch.cat(outputs, dim=1)
            carried = start, output
            self.fill[index] = end
            self.layer_evals += end - start
        if carried is not None:
            self.store.put(hi, carried[0], carried[1][0])

    def _chunk(self, model: SplitLlamaModel, states: torch.Tensor, start: int, end: int, index: int) -> Chunk:
        """Positions, rotary embedding and mask of chunk [start, end), built once per step for all layers that share it.

        The mask depends only on (start, end) and the layer's attention type (full or sliding), because a
        layer's cache holds exactly `start` positions when it runs that chunk, so the edge's first and last
        layers share chunks too. All chunks of a step end at `end`, so their rotary embeddings are slices
        of one range per attention type, computed once (from the earliest start asked for so far).
        """
        if end != self._chunks_end:
            self._chunks, self._rotary, self._chunks_end = {}, {}, end
        key = model.chunk_key(start, index)
        chunk = self._chunks.get(key)
        if chunk is None:
            kind = key[1] if model.family.rotary_per_layer_type else ""  # one range per rotary, not per mask
            rotary = self._rotary.get(kind)
            if rotary is None or rotary[0] > start:
                rotary = self._rotary[kind] = (start, *model.rotary(states, start, end, index))
            first, position_ids, (cos, sin) = rotary
            skip = start - first
            rotary = (position_ids[:, skip:], (cos[:, skip:], sin[:, skip:])) if skip else (position_ids, (cos, sin))
            chunk = self._chunks[key] = model.make_chunk(states, start, self.cache, index, rotary)
        return chunk

    def outgoing(self, cut: int, end: int) -> tuple[int, torch.Tensor]:
        """The states at `cut` that the peer lacks: from its fill count there (or just the last one at cut L)."""
        start = end - 1 if cut == self.num_layers else self.peer_fill[cut]
        return start, self.store.get(cut, start, end)

    def expected_incoming_start(self, cut: int, end: int) -> int:
        """First position the peer will send at `cut`, by the same rule as `outgoing` on its side."""
        return end - 1 if cut == self.num_layers else self.fill[cut]

    def advance_peer(self, layers: Iterable[int], end: int) -> None:
        """Mirror the peer's step: it ran these layers up to `end`."""
        for index in layers:
            self.peer_fill[index] = max(self.peer_fill[index], end)

    def prune(self) -> None:
        """Keep h_j(s) only while this side may still run layer j at s, or must still send it to the peer."""
        self.peak_stored = max(self.peak_stored, self.store.num_positions())
        for layer in list(self.store.runs):
            keep = []
            if layer in self.layer_owner:
                keep.append(self.fill[layer])
            if layer in self.send_cuts and layer in self.peer_layers:
                keep.append(self.peer_fill[layer])
            self.store.keep_from(layer, min(keep) if keep else None)

    def weigh(self, cut: int, states: torch.Tensor, codec: Codec) -> torch.Tensor:
        """What goes into the codec at `cut`: the states times the receiving norm's gains, where they apply."""
        gain = self.link_gains.get(cut) if codec.channel_weighted else None
        return states if gain is None else states * gain.to(states)

    def unweigh(self, cut: int, states: torch.Tensor, codec: Codec) -> torch.Tensor:
        """The inverse of the sender's `weigh`, on the decoded states."""
        gain = self.link_gains.get(cut) if codec.channel_weighted else None
        return states if gain is None else states / gain.to(states)

    def to_compute(self, states: torch.Tensor) -> torch.Tensor:
        return states.to(device=self.device, dtype=self.dtype)

    def received(self, cut: int, states: torch.Tensor, codec: Codec, peak: float = math.inf) -> torch.Tensor:
        """The peer's decoded states at `cut` as this side computes with them: unweighed, on its device, in its dtype.

        ProtocolError where they are finite as sent but pass this side's range (fp16: 65504), before any state changes.
        `peak` bounds their magnitude as decoded (`Codec.decoded`, known on the host). Where it shows that they fit,
        with a percent to spare for the rounding of unweighing and the cast, the states are not read on the device:
        on a GPU that read is a wait in every step. Past that, or without a bound, they are checked there."""
        states = self.to_compute(self.unweigh(cut, states, codec))
        least_gain = self.least_gains.get(cut, 1.0) if codec.channel_weighted else 1.0
        fits = least_gain > 0 and 1.01 * peak / least_gain <= torch.finfo(self.dtype).max
        if not fits and not torch.isfinite(states).all():
            peer = "cloud" if self.role == "edge" else "edge"
            raise ProtocolError(f"the {peer}'s states do not fit the {self.role}'s {dtype_name(self.dtype)}: values past its range")
        return states
