"""The cloud: the middle layers only. It turns request bytes into reply bytes and holds nothing else.

In the three-part split it holds layers [min(first), max(second)) and returns hidden states at the
second cut; in the two-part split (`with_head`) it holds [min(first), L) with norm and head and
returns the greedy token. Every request is validated in full before any state changes, so a
malformed message leaves the session's caches as they were.
"""
from __future__ import annotations

import dataclasses

import torch

from . import protocol
from .base import Party
from .codec import CODECS_BY_ID
from .models import SecondLlamaForCausalLM, ThirdLlamaForCausalLM
from .protocol import Kind
from .schedule import SplitSchedule
from .utils import ProtocolError


class Cloud(Party):
    def __init__(self, schedule: SplitSchedule, part: SecondLlamaForCausalLM | ThirdLlamaForCausalLM):
        L = schedule.num_layers
        edge_layers = set(schedule.edge_first_layers) | set(schedule.edge_third_layers)
        super().__init__(schedule, [part], send_cuts=schedule.second, peer_layers=edge_layers)
        self.part = part
        self.with_head = isinstance(part, ThirdLlamaForCausalLM)
        if self.with_head and schedule.second != (L,):
            raise ValueError("a cloud with the LM head runs to the last layer: second must be {L}")
        self.hidden_size = self.config.hidden_size
        self.session = False

    def reset(self) -> None:
        super().reset()
        self.last_step = -1

    def handle(self, request: bytes) -> bytes:
        """One request, one reply. Raises ProtocolError (state unchanged) on a bad request."""
        with self.timed("decode"):
            message = protocol.decode(request, self.hidden_size)
        if message.kind is Kind.START:
            return self._start(message)
        if message.kind is not Kind.HIDDEN:
            raise ProtocolError(f"the cloud accepts START and HIDDEN messages, not {message.kind.name}")
        return self._step(message)

    def _start(self, message: protocol.Message) -> bytes:
        if message.fingerprint != self.schedule.fingerprint():
            raise ProtocolError("the edge's split sets or model differ from the cloud's (schedule fingerprint mismatch)")
        self.schedule = dataclasses.replace(self.schedule, seed=message.seed, resplit_every=message.resplit_every)
        self.reset()
        self.session = True
        return protocol.encode_start(message.seed, message.resplit_every, message.fingerprint, self.hidden_size)

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
        # Steps after the prefill add one position each; steps the cloud did not see ran wholly on the edge.
        if self.last_step >= 0 and end != self.end + (step - self.last_step):
            raise ProtocolError(f"message ends at position {end - 1}, expected {self.end + step - self.last_step - 1}")
        if self.last_step < 0 and end < step + 1:
            raise ProtocolError(f"message ends at position {end - 1}, too early for step {step}")

        # Valid: from here on the state changes.
        if step > self.last_step + 1:
            self.advance_peer(self.peer_layers, end - 1)
        self.store.put(a, start, self.to_compute(message.hidden))
        self.run_layers(a, b, end)
        if self.with_head:
            with self.timed("compute"):
                token = int(self.part.head(self.store.get(b, end - 1, end)).argmax(-1))
            reply = protocol.encode_token(step, end - 1, token, self.hidden_size)
        else:
            out_start, states = self.outgoing(b, end)
            if not torch.isfinite(states).all():  # finite but huge inputs overflow in the layers
                raise ProtocolError("the states sent drive the model to Inf or NaN (the session's caches are no longer usable)")
            with self.timed("encode"):
                reply = protocol.encode_hidden(step, out_start, states, CODECS_BY_ID[message.codec_id])
        self.advance_peer([i for i in self.peer_layers if i < a or i >= b], end)
        self.prune()
        self.last_step, self.end = step, end
        return reply
