"""The edge: embeddings, the first and last layers, the norm and the head, decoding and sessions.

Prompt and generated tokens never leave this object; what goes to the cloud is the bytes of
`protocol.encode_hidden`. Per step t (prefill is step 0) with cuts (a, b) from the shared schedule:

    edge:  layers [0, a)  ->  message up (h_a at the positions the cloud lacks)
    cloud: layers [a, b)  ->  message down (h_b at the positions the edge lacks)
    edge:  layers [b, L), norm, head  ->  next token

When a == b nothing crosses the link. In the two-part split the cloud returns the token instead.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .base import Party
from .families import context_length
from .link import protocol
from .link.codec import Codec
from .link.local import Link
from .link.protocol import Kind
from .models import FirstLlamaForCausalLM, ThirdLlamaForCausalLM
from .sampling import Sampler, SamplingConfig, two_part_refusal
from .schedule import SplitSchedule
from .utils import ProtocolError, TriadicError


# A session's uplink is replayed whole when a cloud fails over or drops the session (GrpcLink.replay), and an edge
# server's one session serves conversation after conversation, each a TURN cutting the last one back: it kept 571
# messages (16 MB) after 30 requests, and a pause past the cloud's idle timeout replayed them all (33 s before the next
# answer). So a request starts a new session where it keeps less than half of the cached sequence (another
# conversation: re-prefilling what it keeps costs less than what was cut away), or where more than REPLAY_BOUND
# positions per position of its sequence went up since START (edits and regenerations that each cut back less):
# moving cuts {1..6}/{24..29} send 2.48 per position over one conversation.
REPLAY_BOUND = 8


@dataclass
class Generation:
    prompt_token_ids: list[int]  # the whole sequence the request continued (a session: the conversation so far)
    cached_positions: int = 0  # positions of it that were already in the caches (a session's earlier turns)
    token_ids: list[int] = field(default_factory=list)
    splits: list[tuple[int, int]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    positions_up: int = 0
    positions_down: int = 0
    messages_up: int = 0
    messages_down: int = 0
    layer_evals: dict[str, int] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    link_seconds: float = 0.0
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        total = sum(self.step_seconds)
        return len(self.token_ids) / total if total > 0 else 0.0


class Edge(Party):
    role = "edge"

    def __init__(
        self,
        schedule: SplitSchedule,
        first: FirstLlamaForCausalLM,
        third: ThirdLlamaForCausalLM | None,
        codec: Codec,
        link: Link | None = None,
    ):
        """`third` is None in the two-part split, where the cloud holds the head."""
        parts = [first] + ([third] if third is not None else [])
        super().__init__(schedule, parts, send_cuts=schedule.first, peer_layers=schedule.cloud_layers)
        self.first, self.third, self.codec, self.link = first, third, codec, link
        self.use_step_catch_up(codec)
        self.hidden_size = self.config.hidden_size
        self.peer_layer_evals = 0
        self.uplink_noise = 0.0  # privacy mitigation, off by default: see `protect`
        self._noise = torch.Generator().manual_seed(0)
        if link is None and schedule.needs_cloud:
            raise TriadicError("these split sets need a cloud (a < b is possible) but no link was given")

    def advance_peer(self, layers: Iterable[int], end: int) -> None:
        """Mirror the cloud's step, counting the layer evaluations it just did."""
        self.peer_layer_evals += sum(max(0, end - self.peer_fill[i]) for i in layers)
        super().advance_peer(layers, end)

    def reset(self) -> None:
        """Forget the sequence and the session: the next request sends START and prefills from scratch."""
        super().reset()
        self.tokens: list[int] = []  # the token ids of positions 0 .. end-1, as in the caches
        self.next_step = 0  # steps count on across the requests of a session (the schedule's t)
        self.started = False  # whether the cloud has this session (START sent)
        self.sent_positions = 0  # positions sent up since START: what a failover or reopen would replay (GrpcLink.replay)

    @torch.inference_mode()  # see the Party docstring
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        eos_token_ids: Iterable[int] = (),
        on_token: Callable[[int], bool | None] | None = None,
        keep_logits: bool = False,
        forced_tokens: list[int] | None = None,
        on_logits: Callable[[int, torch.Tensor], None] | None = None,
        sampling: SamplingConfig | None = None,
    ) -> Generation:
        """One request from empty caches: a session of one turn (see `Session` for more)."""
        self.reset()
        return self.continue_with(prompt_ids, max_new_tokens, eos_token_ids, on_token, keep_logits, forced_tokens, on_logits, sampling)

    def session(self) -> Session:
        return Session(self)

    @torch.inference_mode()  # see the Party docstring
    def continue_with(
        self,
        token_ids: list[int],
        max_new_tokens: int,
        eos_token_ids: Iterable[int] = (),
        on_token: Callable[[int], bool | None] | None = None,
        keep_logits: bool = False,
        forced_tokens: list[int] | None = None,
        on_logits: Callable[[int, torch.Tensor], None] | None = None,
        sampling: SamplingConfig | None = None,
    ) -> Generation:
        """Decode after `token_ids` (the whole sequence so far), reusing the cached prefix they share.

        As `generate(do_sample=...)` with transformers' processors for `sampling` (resolved against
        the model's generation_config by the caller; greedy when None). Stops after an EOS token
        (kept), after max_new_tokens, or when `on_token(token)` returns True. With `forced_tokens` the
        next token is taken from that list instead (teacher forcing, for fidelity measurements);
        `on_logits(step, logits)` sees the edge's logits at every step.
        """
        context, why = context_length(self.config)
        if max_new_tokens < 1:  # else the cloud would mirror positions the edge never ran, and the session's next request fail
            raise TriadicError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if not token_ids:
            raise TriadicError("empty prompt")
        if len(token_ids) + max_new_tokens > context:
            raise TriadicError(
                f"prompt of {len(token_ids)} tokens + {max_new_tokens} new tokens exceeds the model's context of {context}{why}"
            )
        sampling = sampling if sampling is not None else SamplingConfig().resolved()
        if self.third is None and sampling.edge_only:
            raise TriadicError(two_part_refusal(sampling))
        sampling.check_vocabulary(self.config.vocab_size)
        try:
            return self._decode(list(token_ids), max_new_tokens, set(eos_token_ids), on_token, keep_logits, forced_tokens, on_logits, sampling)
        except BaseException:
            self.reset()  # a request that failed half-way leaves no half-updated session: the next one starts afresh
            raise

    def _decode(self, tokens: list[int], max_new_tokens: int, eos: set[int], on_token, keep_logits: bool,
                forced_tokens: list[int] | None, on_logits, sampling: SamplingConfig) -> Generation:
        self._begin(tokens, sampling)
        self.layer_evals = self.peer_layer_evals = 0
        result = Generation(prompt_token_ids=list(tokens), cached_positions=self.end)
        sampler = Sampler(sampling, self.device, tokens, max_new_tokens, eos) if self.third is not None else None
        for _ in range(max_new_tokens):
            step, self.next_step = self.next_step, self.next_step + 1
            began = time.perf_counter()
            token, logits = self._step(step, tokens, result, sampler)
            result.step_seconds.append(time.perf_counter() - began)
            if on_logits is not None and logits is not None:
                on_logits(step, logits)
            if forced_tokens is not None:
                if len(result.token_ids) == len(forced_tokens):
                    break
                token = forced_tokens[len(result.token_ids)]
            tokens.append(token)
            result.token_ids.append(token)
            if keep_logits and logits is not None:
                result.logits.append(logits)
            stop = on_token(token) if on_token is not None else False
            if token in eos or stop:
                break
        result.layer_evals = {"edge": self.layer_evals, "cloud": self.peer_layer_evals}
        return result

    def reusable_prefix(self, token_ids: list[int]) -> int:
        """Positions of `token_ids` the caches hold already and can keep: the longest common prefix (at least
        one position must run), or 0 where a sliding-window cache has dropped what truncating to it would need."""
        keep, limit = 0, min(len(self.tokens), len(token_ids) - 1)
        while keep < limit and self.tokens[keep] == token_ids[keep]:
            keep += 1
        return keep if keep >= self.end or self.can_truncate() else 0

    def planned_keep(self, token_ids: list[int]) -> int:
        """The positions a request for `token_ids` will keep (`reusable_prefix`), or 0 where it starts the session afresh:
        what a server reports as cached before the request runs."""
        keep = self.reusable_prefix(token_ids)
        return 0 if self._starts_afresh(token_ids, keep) else keep

    def _starts_afresh(self, token_ids: list[int], keep: int) -> bool:
        """Whether a request keeping `keep` positions starts a new session instead: a sliding-window cache has dropped
        what truncating to them needs, it keeps less than half the session (another conversation), or the session
        has sent more than REPLAY_BOUND positions per position of the sequence (see REPLAY_BOUND)."""
        dropped = keep < self.end and not self.can_truncate()
        return dropped or 2 * keep < self.end or self.sent_positions > REPLAY_BOUND * len(token_ids)

    def _begin(self, token_ids: list[int], sampling: SamplingConfig) -> None:
        """Keep the longest cached prefix of `token_ids` and tell the cloud."""
        keep = self.reusable_prefix(token_ids)
        if self._starts_afresh(token_ids, keep):
            self.reset()
            keep = 0
        if self.link is not None:
            if not self.started:
                plain = not (sampling.do_sample or sampling.edge_only)  # a greedy START stays as it was
                start = protocol.encode_start(
                    self.schedule.seed, self.schedule.resplit_every, self.schedule.fingerprint(), self.hidden_size,
                    None if plain else sampling,
                )
                self._expect(start, Kind.START)
            else:
                turn = protocol.encode_turn(self.next_step, keep, len(token_ids) - keep, self.end, sampling, self.hidden_size)
                self._expect(turn, Kind.TURN)
        self.started = True
        self.truncate(keep)
        self.prefills.append((keep, len(token_ids)))
        self.tokens = self.tokens[:keep]

    def can_truncate(self) -> bool:
        """Whether the caches can be cut back: a sliding-window layer past its window has dropped old positions."""
        windows = [getattr(layer, "sliding_window", None) for layer in self.cache.layers if getattr(layer, "is_sliding", False)]
        return not windows or self.end < min(w for w in windows if w is not None)

    def _expect(self, request: bytes, kind: Kind) -> None:
        assert self.link is not None  # an edge without a cloud sends nothing
        reply = protocol.decode(self.link.request(request), self.hidden_size)
        if reply.kind is not kind:
            raise ProtocolError(f"the cloud answered {kind.name} with {reply.kind.name}")

    def _step(self, step: int, tokens: list[int], result: Generation, sampler: Sampler | None) -> tuple[int, torch.Tensor | None]:
        start, end = self.end, len(tokens)
        vocabulary = self.config.vocab_size  # the embedding's rows: the weights were checked against the config
        if not all(0 <= token < vocabulary for token in tokens[start:end]):  # checked on the host: no device sync per step
            raise TriadicError(f"token id {max(tokens[start:end])} is outside the model's vocabulary of {vocabulary}: "
                               "the tokenizer does not match the checkpoint")
        a, b = self.schedule.cuts(step)
        result.splits.append((a, b))
        new_ids = torch.tensor([tokens[start:end]], device=self.device)
        with self.timed("compute"):
            self.store.put(0, start, self.first.model.embed(new_ids)[0])
        self.run_layers(0, a, end)

        token = logits = None
        if a < b:
            reply = self._exchange(step, a, b, end, result)
            if reply.kind is Kind.TOKEN:
                token = reply.token
            else:
                self.store.put(b, reply.start, self.received(b, reply.hidden, self.codec, reply.peak))
        if token is None:
            assert self.third is not None and sampler is not None  # without them, the cloud sends the token
            self.run_layers(b, self.num_layers, end)
            with self.timed("compute"):
                logits = self.third.head(self.store.get(self.num_layers, end - 1, end))[0]
                token = sampler.choose(logits, tokens if sampler.config.edge_only else None)
        self.prune()
        self.end = end
        self.tokens.extend(tokens[len(self.tokens) : end])
        return token, logits

    def protect(self, states: torch.Tensor) -> torch.Tensor:
        """Optional mitigation: Gaussian noise of `uplink_noise` times each position's typical magnitude.

        The scale is a robust one (1.4826 x median |h|), so that the massive outlier channels do not
        set it. The noise is added to what leaves the edge only; the edge's own states stay clean.
        """
        if self.uplink_noise <= 0:
            return states
        sigma = 1.4826 * states.abs().median(dim=-1, keepdim=True).values
        noise = torch.randn(states.shape, generator=self._noise).to(states)
        return states + self.uplink_noise * sigma * noise

    def _exchange(self, step: int, a: int, b: int, end: int, result: Generation) -> protocol.Message:
        """Send h_a for the positions the cloud lacks; receive and check h_b (or the token)."""
        out_start, states = self.outgoing(a, end)
        with self.timed("encode"):
            request = protocol.encode_hidden(step, out_start, self.weigh(a, self.protect(states), self.codec), self.codec)
        began = time.perf_counter()
        assert self.link is not None  # a < b: this schedule has a cloud
        raw_reply = self.link.request(request)
        result.link_seconds += time.perf_counter() - began
        self.advance_peer(range(a, b), end)
        with self.timed("decode"):
            reply = protocol.decode(raw_reply, self.hidden_size, self.device)
        result.bytes_up += len(request)
        result.bytes_down += len(raw_reply)
        result.positions_up += len(states)
        self.sent_positions += len(states)
        result.messages_up += 1
        result.messages_down += 1
        if reply.step != step:
            raise ProtocolError(f"reply for step {reply.step}, expected {step}")
        if self.third is None:
            if reply.kind is not Kind.TOKEN:
                raise ProtocolError(f"expected a TOKEN reply, got {reply.kind.name}")
            return reply
        if reply.kind is not Kind.HIDDEN:
            raise ProtocolError(f"expected a HIDDEN reply, got {reply.kind.name}")
        expected = self.expected_incoming_start(b, end)
        if reply.start != expected or reply.start + reply.count != end:
            raise ProtocolError(f"reply carries positions {reply.start}..{reply.start + reply.count - 1}, expected {expected}..{end - 1}")
        result.positions_down += reply.count
        return reply


class Session:
    """A conversation whose KV caches, on the edge and in the cloud, survive between requests.

        with edge.session() as chat:
            first = chat.generate(ids_of_turn_1, 64, eos)
            second = chat.generate(ids_of_turns_1_and_2, 64, eos)  # runs only the new positions

    Each request passes the whole sequence so far; the positions it shares with the cached ones are
    kept and only the rest is run (over gRPC: the same stream, one TURN message per request). A
    request whose history differs from the cached one cuts both sides back to the longest common
    prefix. Leaving the block ends the cloud's session.
    """

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    def __enter__(self) -> Session:
        self.edge.reset()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, token_ids: list[int], max_new_tokens: int, eos_token_ids: Iterable[int] = (), on_token=None,
                 sampling: SamplingConfig | None = None) -> Generation:
        return self.edge.continue_with(token_ids, max_new_tokens, eos_token_ids, on_token, sampling=sampling)

    def reset(self) -> None:
        """Forget the conversation; the next request starts a new session with the cloud."""
        self.edge.reset()

    def close(self) -> None:
        self.edge.reset()
        end_session = getattr(self.edge.link, "end_session", None)
        if end_session is not None:  # the cloud frees the session at once, remote or in this process
            end_session()
