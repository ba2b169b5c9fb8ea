"""The cloud: the middle layers only. It turns request bytes into reply bytes and holds nothing else.

In the three-part split it holds layers [min(first), max(second)) and returns hidden states at the
second cut; in the two-part split (`with_head`) it holds [min(first), L) with norm and head and
returns the token, chosen with the request's sampling options (START or TURN). Every request is
validated in full before any state changes, so a malformed message leaves the session's caches as
they were.

A session may hold several requests (turns): START opens it, each later request begins with TURN,
which says where the turn starts (step), how many positions both sides keep (a truncation when
fewer than cached) and how many its first step appends, so that every later message's end
position is known: the sequence ends at `turn_end + (step - turn_step)` after step `step`.
"""
from __future__ import annotations

import dataclasses

import torch

from .base import Party
from .link import protocol
from .link.codec import CODECS_BY_ID, NotFinite
from .link.protocol import Kind
from .models import SecondLlamaForCausalLM, ThirdLlamaForCausalLM
from .sampling import Sampler
from .schedule import SplitSchedule
from .utils import ProtocolError

# Values that fit the compute dtype can still overflow inside the layers (huge fp16 inputs): found only after the
# layers ran, so the session cannot go on.
DRIVEN_PAST_RANGE = "the states sent drive the model to Inf or NaN (the session's caches are no longer usable)"


class Cloud(Party):
    role = "cloud"

    def __init__(self, schedule: SplitSchedule, part: SecondLlamaForCausalLM | ThirdLlamaForCausalLM):
        L = schedule.num_layers
        edge_layers = set(schedule.edge_first_layers) | set(schedule.edge_third_layers)
        super().__init__(schedule, [part], send_cuts=schedule.second, peer_layers=edge_layers)
        self.part = part
        self.with_head = isinstance(part, ThirdLlamaForCausalLM)
        if self.with_head and schedule.second != (L,):
            raise ValueError(f"a cloud with the LM head runs to the last layer: second must be {{{L}}}")
        self.hidden_size = self.config.hidden_size
        self.session = False

    def end_session(self) -> None:
        """The session is over: forget it and free its caches now (a server drops the whole Cloud instead)."""
        self.reset()
        self.session = False

    def reset(self) -> None:
        super().reset()
        self.last_step = -1
        self.turn_step = 0  # the current request's first step
        self.turn_end: int | None = None  # sequence length after turn_step; unknown after START until the first HIDDEN
        self.sampler: Sampler | None = None

    def expected_end(self, step: int) -> int | None:
        """The sequence length after `step` of the current request (each step after its first appends one position)."""
        return None if self.turn_end is None else self.turn_end + step - self.turn_step

    @torch.inference_mode()  # see the Party docstring
    def handle(self, request: bytes) -> bytes:
        """One request, one reply. Raises ProtocolError (state unchanged) on a bad request."""
        with self.timed("decode"):
            message = protocol.decode(request, self.hidden_size, self.device)
        if message.kind is Kind.START:
            return self._start(message)
        if message.kind is Kind.TURN:
            return self._turn(message)
        if message.kind is not Kind.HIDDEN:
            raise ProtocolError(f"the cloud accepts START, TURN and HIDDEN messages, not {message.kind.name}")
        return self._step(message)

    def _start(self, message: protocol.Message) -> bytes:
        if message.fingerprint != self.schedule.fingerprint():
            raise ProtocolError("the edge's split sets or model differ from the cloud's (schedule fingerprint mismatch)")
        self._check_sampling(message.sampling)
        self.schedule = dataclasses.replace(self.schedule, seed=message.seed, resplit_every=message.resplit_every)
        if self.session or self.end or self.last_step >= 0:  # not the fresh Cloud a server makes for each stream
            self.reset()
        self.session = True
        self.sampler = Sampler(message.sampling, self.device) if self.with_head else None
        if self.batcher is not None:
            self.batcher.expect(self)
        return protocol.encode_start(message.seed, message.resplit_every, message.fingerprint, self.hidden_size)

    def _check_sampling(self, sampling) -> None:
        if self.with_head and sampling.edge_only:
            raise ProtocolError("the two-part cloud never sees the prompt's tokens: it cannot apply a repetition penalty")

    def _turn(self, message: protocol.Message) -> bytes:
        """A new request: mirror the edge's steps the cloud did not see, truncate, reseed the sampler."""
        if not self.session:
            raise ProtocolError("no session: the edge must send START first")
        step, keep, edge_end = message.step, message.start, message.edge_end
        if step <= self.last_step:
            raise ProtocolError(f"a request starting at step {step} does not follow step {self.last_step}")
        expected = self.expected_end(step - 1)
        if expected is not None and edge_end != expected:
            raise ProtocolError(f"the edge says it processed {edge_end} positions; the cloud's mirror says {expected}")
        if keep > edge_end:
            raise ProtocolError(f"cannot keep {keep} positions of a sequence of {edge_end}")
        self._check_sampling(message.sampling)

        # Valid: from here on the state changes.
        if step > self.last_step + 1:  # the steps since the last message ran wholly on the edge
            self.advance_peer(self.peer_layers, edge_end)
        self.truncate(keep)
        self.prefills.append((keep, keep + message.count))
        self.last_step, self.turn_step, self.turn_end = step - 1, step, keep + message.count
        self.sampler = Sampler(message.sampling, self.device) if self.with_head else None
        return protocol.encode_turn(step, keep, message.count, edge_end, message.sampling, self.hidden_size)

    def _step(self, message: protocol.Message) -> bytes:
        if not self.session:
            raise ProtocolError("no session: the edge must send START first")
        step, start, count = message.step, message.start, message.count
        if step <= self.last_step:
            raise ProtocolError(f"step {step} does not follow step {self.last_step}")
        a, b = self.schedule.cuts(step)
        if a == b:
            raise ProtocolError(f"step {step} has no cloud layers; nothing should have been sent")
        if start != self.fill[a]:
            raise ProtocolError(f"positions start at {start} but the cloud's cache at this cut holds {self.fill[a]}")
        end = start + count
        # Steps after a request's first add one position each; steps the cloud did not see ran wholly on the edge.
        expected = self.expected_end(step)
        if expected is not None and end != expected:
            raise ProtocolError(f"message ends at position {end - 1}, expected {expected - 1}")
        if expected is None and end < step - self.turn_step + 1:
            raise ProtocolError(f"message ends at position {end - 1}, too early for step {step}")
        codec = CODECS_BY_ID[message.codec_id]
        incoming = self.received(a, message.hidden, codec, message.peak)

        # Valid: from here on the state changes.
        if self.turn_end is None:  # the session's first request, from position 0
            self.turn_end = end - (step - self.turn_step)
            self.prefills.append((0, self.turn_end))
        if step > self.last_step + 1:
            self.advance_peer(self.peer_layers, end - 1)
        self.use_step_catch_up(codec)
        self.store.put(a, start, incoming)
        self.run_layers(a, b, end)
        if self.with_head:
            assert self.sampler is not None  # made at the START or TURN of a cloud with the head
            with self.timed("compute"):
                logits = self.part.head(self.store.get(b, end - 1, end))[0]
                if not torch.isfinite(logits).all():  # finite but huge inputs overflow in the layers (fp16)
                    raise ProtocolError(DRIVEN_PAST_RANGE)
                token = self.sampler.choose(logits)
            reply = protocol.encode_token(step, end - 1, token, self.hidden_size)
        else:
            out_start, states = self.outgoing(b, end)
            with self.timed("encode"):
                try:  # the codec checks on its host copy: no wait on a GPU for a check of its own
                    reply = protocol.encode_hidden(step, out_start, self.weigh(b, states, codec), codec)
                except NotFinite:  # finite but huge inputs overflow in the layers
                    raise ProtocolError(DRIVEN_PAST_RANGE) from None
        self.advance_peer([i for i in self.peer_layers if i < a or i >= b], end)
        self.prune()
        self.last_step, self.end = step, end
        return reply
