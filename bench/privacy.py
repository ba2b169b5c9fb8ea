"""Privacy evaluation: what an eavesdropper on the link, or a curious cloud, recovers from the hidden states.

    python -m bench.privacy            # writes results/privacy.md, results/privacy_recovery.png, results/privacy_fidelity.png

The attacker plays against what actually crosses the link: the bytes the Edge sends and the Cloud
returns, recorded by a wrapper around the cloud's `handle` and decoded with `protocol.decode`, per
codec. It knows the public weights of the embedded model (SmolLM2-135M-Instruct) and trains its
attack models only on the two training texts (bench/data/train_*.txt); it is scored on the held-out
text (bench/data/heldout_lighthouse.txt). Attacks:

    input tokens, from edge->cloud states at cut a:
      nn       cosine nearest neighbour of the state among the token embeddings
      ridge    ridge regression from the (norm-scaled, standardised) layer-a state to the token's
               unit embedding, then the nearest embedding; lambda picked on a held-out slice of the
               training text
      match    public-weights forward matching: for each position, the ridge probe's top-K tokens are
               pushed through the public layers 0..a-1 (context from the ridge's guesses at earlier
               positions) and the one whose layer-a state is closest to the observed state wins
    output tokens, from cloud->edge states at cut b:
      replay   the public layers b..L-1, final norm and head, run on the received states in the
               order they arrive, exactly as the edge does
      lens     final norm and head only, on the received state (an attacker without the tail layers)
    the layer of a message under random cuts:
      START    the START message carries the schedule seed in clear; the split sets follow from its
               fingerprint (CRC-32 of the sets) by trying every pair of contiguous ranges
      classifier  a ridge classifier on per-position state features, summed over the message

Everything runs on CPU; the whole run takes a few minutes (see the runtime line of the report).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from src import protocol
from src.codec import get_codec
from src.protocol import Kind
from src.schedule import SplitSchedule

DATA = Path(__file__).resolve().parent / "data"
TRAIN_TEXTS = ("train_kitchen_science.txt", "train_travel_letters.txt")
TEST_TEXT = "heldout_lighthouse.txt"
SWEEP_LAYERS = (0, 1, 2, 3, 4, 5, 6, 8, 15, 22, 29)
MATCH_LAYERS = (1, 2, 3, 4, 5, 6, 8, 15, 22, 29)  # cost: about K forward passes up to the cut
LAMBDAS = (0.1, 1.0, 10.0, 100.0)
SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)


# ----------------------------------------------------------------------------------------------
# Recording what crosses the link


class UplinkCaptured(Exception):
    """Raised by a RecordingLink told to stop once the first HIDDEN request has been recorded."""


class RecordingLink:
    """A link that records every request (edge->cloud) and reply (cloud->edge) as raw bytes.

    `send` is the receiving side (normally `cloud.handle`). With `stop_at_uplink` the session stops
    (UplinkCaptured) right after the first HIDDEN request: the edge has sent its message, the cloud
    never computes, which is all an uplink-only measurement needs.
    """

    def __init__(self, send: Callable[[bytes], bytes], hidden_size: int, stop_at_uplink: bool = False):
        self.send, self.hidden_size, self.stop_at_uplink = send, hidden_size, stop_at_uplink
        self.requests: list[bytes] = []
        self.replies: list[bytes] = []

    def request(self, data: bytes) -> bytes:
        data = bytes(data)
        self.requests.append(data)
        if self.stop_at_uplink and protocol.decode(data, self.hidden_size).kind is Kind.HIDDEN:
            raise UplinkCaptured
        reply = bytes(self.send(data))
        self.replies.append(reply)
        return reply


@dataclass
class Recording:
    requests: list[bytes]
    replies: list[bytes]
    generation: object | None  # src.edge.Generation, None when stopped at the uplink


def record(
    pipeline, prompt_ids: Sequence[int], max_new_tokens: int, forced_tokens: Sequence[int] | None = None,
    stop_at_uplink: bool = False,
) -> Recording:
    """Run one session through the pipeline with a recording link in place of the edge's link."""
    hidden = pipeline.config.hidden_size
    link = RecordingLink(pipeline.cloud.handle, hidden, stop_at_uplink)
    original = pipeline.edge.link
    pipeline.edge.link = link
    generation = None
    try:
        generation = pipeline.edge.generate(
            list(prompt_ids), max_new_tokens, forced_tokens=list(forced_tokens) if forced_tokens is not None else None
        )
    except UplinkCaptured:
        pass
    finally:
        pipeline.edge.link = original
    return Recording(link.requests, link.replies, generation)


def hidden_messages(raws: Iterable[bytes], hidden_size: int) -> list[protocol.Message]:
    """The HIDDEN messages among raw recorded bytes (START and TOKEN messages are skipped)."""
    messages = [protocol.decode(raw, hidden_size) for raw in raws]
    return [m for m in messages if m.kind is Kind.HIDDEN]


def transcode(raw: bytes, codec_name: str, hidden_size: int) -> bytes:
    """The bytes the sender would have produced with another codec for the same states.

    Exact for messages whose states do not depend on the codec (every edge->cloud message of a fixed
    split: the edge computes layers 0..a-1 from the embeddings alone); tests/test_privacy.py checks
    it against a real int8 pipeline.
    """
    message = protocol.decode(raw, hidden_size)
    return protocol.encode_hidden(message.step, message.start, message.hidden, get_codec(codec_name))


@dataclass
class Exposure:
    """One message: the states of positions start .. start + count - 1 at one cut layer."""

    step: int
    layer: int
    start: int
    states: torch.Tensor

    @property
    def positions(self) -> range:
        return range(self.start, self.start + len(self.states))


def exposures(messages: Iterable[protocol.Message], layer_of_step: Callable[[int], int]) -> list[Exposure]:
    return [Exposure(m.step, layer_of_step(m.step), m.start, m.hidden.float()) for m in messages]


def schedule_from_start(raw: bytes, hidden_size: int, num_layers: int) -> SplitSchedule | None:
    """What an eavesdropper learns from the START message: the seed is in clear, and the split sets
    follow from the fingerprint by trying every pair of contiguous ranges (about 40,000 at L = 30)."""
    message = protocol.decode(raw, hidden_size)
    if message.kind is not Kind.START:
        raise ValueError("not a START message")
    sets = _sets_from_fingerprint(message.fingerprint, num_layers)
    return None if sets is None else SplitSchedule(sets[0], sets[1], num_layers, message.seed, message.resplit_every)


@functools.lru_cache(maxsize=16)
def _sets_from_fingerprint(fingerprint: int, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    L = num_layers
    for lo1 in range(L + 1):
        for hi1 in range(lo1, L + 1):
            for lo2 in range(hi1, L + 1):
                for hi2 in range(lo2, L + 1):
                    sets = tuple(range(lo1, hi1 + 1)), tuple(range(lo2, hi2 + 1))
                    if SplitSchedule(sets[0], sets[1], L).fingerprint() == fingerprint:
                        return sets
    return None


def lowest_exposure(found: Sequence[Exposure], length: int, layer_of: Callable[[Exposure], int] | None = None,
                    first_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the state from the message with the lowest (identified) layer, or the first message.

    Returns (layer per position, -1 where never seen; states [length, hidden]).
    """
    layer_of = layer_of or (lambda e: e.layer)
    hidden = found[0].states.shape[1]
    layers = torch.full((length,), -1, dtype=torch.long)
    states = torch.zeros(length, hidden)
    for exposure in found:
        layer = layer_of(exposure)
        for i, position in enumerate(exposure.positions):
            if position >= length:
                continue
            if layers[position] < 0 or (not first_only and layer < layers[position]):
                layers[position] = layer
                states[position] = exposure.states[i]
    return layers, states


# ----------------------------------------------------------------------------------------------
# Clean states, probes and scores


def text_ids(tokenizer, name: str) -> list[int]:
    return tokenizer((DATA / name).read_text())["input_ids"]


@torch.no_grad()
def clean_states(model, token_ids: Sequence[int], layers: Iterable[int], chunk: int = 256, min_chunk: int = 16):
    """hidden_states[k] (the input of layer k) of the unsplit public model, text cut into chunks that start at position 0."""
    layers = sorted(set(layers))
    out: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    tokens: list[int] = []
    for begin in range(0, len(token_ids), chunk):
        piece = list(token_ids[begin : begin + chunk])
        if len(piece) < min_chunk:
            break
        body = getattr(model, "model", model)  # the LlamaModel: hidden states without the LM head's cost
        hidden = body(torch.tensor([piece]), output_hidden_states=True).hidden_states
        for k in layers:
            out[k].append(hidden[k][0].float())
        tokens += piece
    return {k: torch.cat(v) for k, v in out.items()}, torch.tensor(tokens)


def normalise(h: torch.Tensor) -> torch.Tensor:
    """Each state scaled to unit norm: position 0 and the massive outlier channels stop dominating the fit."""
    return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def add_uplink_noise(h: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """The same noise as Edge.protect: sigma x (1.4826 x median |h|) per position."""
    if sigma <= 0:
        return h
    scale = 1.4826 * h.abs().median(dim=-1, keepdim=True).values
    return h + sigma * scale * torch.randn(h.shape, generator=generator)


@dataclass
class Ridge:
    """Standardised ridge regression: y = ((x - mean) / scale) @ weight."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    lam: float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.scale) @ self.weight


def fit_ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> Ridge:
    x, y = x.double(), y.double()
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    weight = torch.linalg.solve(z.T @ z + lam * torch.eye(z.shape[1], dtype=z.dtype), z.T @ y)
    return Ridge(mean.float(), scale.float(), weight.float(), lam)


def fit_ridge_cv(x, y, lambdas: Sequence[float], score: Callable[[Ridge, slice], float], val_fraction: float = 0.15):
    """Pick lambda on the last `val_fraction` of the rows (contiguous text), then refit on all rows."""
    n_fit = int(len(x) * (1 - val_fraction))
    best = max(lambdas, key=lambda lam: score(fit_ridge(x[:n_fit], y[:n_fit], lam), slice(n_fit, None)))
    return fit_ridge(x, y, best)


def recovery(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of positions whose recovered token id is the true one."""
    return float((predicted.reshape(-1) == truth.reshape(-1)).float().mean())


class TokenProbe:
    """Layer-k state -> token: ridge to the token's unit embedding, then the nearest embedding (cosine)."""

    def __init__(self, embeddings: torch.Tensor, ridge: Ridge | None = None):
        self.unit = normalise(embeddings.float())
        self.ridge = ridge

    @classmethod
    def fit(cls, embeddings, states, tokens, lambdas=LAMBDAS) -> "TokenProbe":
        probe = cls(embeddings)
        x, y = normalise(states.float()), probe.unit[tokens]

        def score(ridge: Ridge, rows: slice) -> float:
            return recovery((ridge(x[rows]) @ probe.unit.T).argmax(-1), tokens[rows])

        probe.ridge = fit_ridge_cv(x, y, lambdas, score)
        return probe

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        return self.ridge(normalise(states.float())) @ self.unit.T

    def predict(self, states: torch.Tensor) -> torch.Tensor:
        return self.scores(states).argmax(-1)

    def top(self, states: torch.Tensor, k: int) -> torch.Tensor:
        return self.scores(states).topk(k, dim=-1).indices


def nearest_neighbour(states: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Attack (a): the token whose embedding has the highest cosine with the state."""
    return (normalise(states.float()) @ normalise(embeddings.float()).T).argmax(-1)


def layer_features(h: torch.Tensor) -> torch.Tensor:
    """Direction plus three scale features (log norm, log median |h|, log max |h|) per position."""
    a = h.float().abs()
    norm = h.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scale = torch.cat([norm.log(), a.median(-1, keepdim=True).values.clamp_min(1e-12).log(), a.amax(-1, keepdim=True).log()], -1)
    return torch.cat([h.float() / norm, scale], -1)


class LayerClassifier:
    """Which of `layers` a message comes from: a ridge classifier on per-position features, scores summed over the message."""

    def __init__(self, layers: Sequence[int], states: dict[int, torch.Tensor], lam: float = 10.0):
        self.layers = list(layers)
        x = torch.cat([layer_features(states[k]) for k in self.layers])
        labels = torch.cat([torch.full((len(states[k]),), i) for i, k in enumerate(self.layers)])
        self.ridge = fit_ridge(x, torch.nn.functional.one_hot(labels, len(self.layers)).float(), lam)

    def position_scores(self, states: torch.Tensor) -> torch.Tensor:
        return self.ridge(layer_features(states))

    def predict_positions(self, states: torch.Tensor) -> list[int]:
        return [self.layers[i] for i in self.position_scores(states).argmax(-1).tolist()]

    def predict_message(self, states: torch.Tensor) -> int:
        return self.layers[int(self.position_scores(states).sum(0).argmax())]


class Matcher:
    """Public-weights forward matching (the strongest input attack here).

    For every position t with an observed state at layer k_t, each candidate token is pushed through
    the public layers 0..k_t-1 as position t, attending to the keys and values of a guessed prefix
    (one token per earlier position, e.g. the ridge probe's top-1); the candidate whose state is
    closest (relative L2) to the observed one wins. With the true token among the candidates and a
    right prefix the distance is ~1e-7: recovery is then bounded by the candidates' recall. All
    positions and candidates run in parallel: cost about K forward passes of the sequence up to max k_t.
    """

    def __init__(self, model):
        self.model = model.model  # LlamaModel of a LlamaForCausalLM
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads

    @torch.no_grad()
    def match(self, observed: torch.Tensor, layer_of: torch.Tensor, candidates: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
        """observed [N, d] at layer layer_of[t] (-1: not seen, keep the guess); candidates [N, K]; guess [N] ids."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        n, k = candidates.shape
        top = int(layer_of.max())
        if top < 0:
            return guess.clone()
        embed = self.model.embed_tokens
        prefix = embed(guess[None]).float()  # [1, N, d]
        x = embed(candidates.T).float()  # [K, N, d]
        cos, sin = self.model.rotary_emb(prefix, torch.arange(n)[None])
        groups = self.heads // self.kv_heads
        strict = torch.ones(n, n, dtype=torch.bool).triu(0)  # a candidate at t sees the prefix at s < t, and itself
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        distance = torch.full((n, k), float("inf"))
        for layer_index in range(top + 1):
            here = layer_of == layer_index
            if here.any():
                target = observed[here].float()
                distance[here] = ((x[:, here] - target[None]).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-12)[None]).T
            if layer_index == top:
                break
            layer = self.model.layers[layer_index]
            attn = layer.self_attn
            scaling = getattr(attn, "scaling", self.head_dim**-0.5)

            def project(h):
                y = layer.input_layernorm(h)
                b = y.shape[0]
                q = attn.q_proj(y).view(b, n, self.heads, self.head_dim).transpose(1, 2)
                kk = attn.k_proj(y).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
                v = attn.v_proj(y).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
                q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
                return q, kk.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)

            def finish(h, attended):
                h = h + attn.o_proj(attended.transpose(1, 2).reshape(h.shape[0], n, -1))
                return h + layer.mlp(layer.post_attention_layernorm(h))

            qp, kp, vp = project(prefix)
            weights = (qp @ kp.transpose(-1, -2) * scaling).masked_fill(causal, float("-inf")).softmax(-1)
            next_prefix = finish(prefix, weights @ vp)
            q, kc, vc = project(x)
            to_prefix = (q @ kp.transpose(-1, -2) * scaling).masked_fill(strict, float("-inf"))  # [K, H, N, N]
            to_self = (q * kc).sum(-1, keepdim=True) * scaling  # [K, H, N, 1]
            weights = torch.cat([to_prefix, to_self], -1).softmax(-1)
            x = finish(x, weights[..., :n] @ vp + weights[..., n:] * vc)
            prefix = next_prefix
        self.last_distance = distance
        best = candidates.gather(1, distance.argmin(1, keepdim=True))[:, 0]
        return torch.where(layer_of >= 0, best, guess)


class Replay:
    """Public layers [lo, L), final norm and head, fed with received states in the order they arrive.

    This is what the receiving edge itself runs (same layer code, src.base.Party): a curious cloud or
    an eavesdropper with the public weights gets the edge's logits, hence its tokens.
    """

    def __init__(self, model_dir: Path, config, schedule: SplitSchedule, lo: int):
        from src.base import Party
        from src.models import ThirdLlamaForCausalLM

        self.part = ThirdLlamaForCausalLM.from_checkpoint(model_dir, config, range(lo, config.num_hidden_layers))
        self.party = Party(schedule, [self.part], send_cuts=(), peer_layers=())
        self.num_layers = config.num_hidden_layers

    def reset(self) -> None:
        self.party.reset()

    @torch.no_grad()
    def feed(self, cut: int, start: int, states: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """Logits of the last position (or of every position of this message)."""
        end = start + len(states)
        self.party.store.put(cut, start, self.party.to_compute(states))
        self.party.run_layers(cut, self.num_layers, end)
        first = start if all_positions else end - 1
        return self.part.head(self.party.store.get(self.num_layers, first, end)).float()

    @torch.no_grad()
    def lens(self, states: torch.Tensor) -> torch.Tensor:
        """Logit lens: final norm and head only, no tail layers."""
        return self.part.head(self.party.to_compute(states)).float()


# ----------------------------------------------------------------------------------------------
# The experiments


@dataclass
class Context:
    model_dir: Path
    config: object
    model: object  # the full public HF model
    embeddings: torch.Tensor
    train_states: dict[int, torch.Tensor]
    train_tokens: torch.Tensor
    test_ids: list[int]
    probes: dict[int, TokenProbe] = field(default_factory=dict)
    matcher: Matcher | None = None
    candidates: int = 8
    match_layers: tuple[int, ...] = MATCH_LAYERS

    @property
    def hidden(self) -> int:
        return self.config.hidden_size


def attack_inputs(ctx: Context, layers: torch.Tensor, states: torch.Tensor, truth: torch.Tensor, match: bool,
                  probes: dict[int, TokenProbe] | None = None) -> dict[str, float]:
    """nn / ridge / match recovery over positions with a state at a known layer per position."""
    probes = probes or ctx.probes
    guess = torch.empty(len(truth), dtype=torch.long)
    candidates = torch.empty(len(truth), ctx.candidates, dtype=torch.long)
    for layer in layers.unique().tolist():
        rows = layers == layer
        scores = probes[layer].scores(states[rows])
        guess[rows] = scores.argmax(-1)
        candidates[rows] = scores.topk(ctx.candidates, -1).indices
    result = {"nn": recovery(nearest_neighbour(states, ctx.embeddings), truth), "ridge": recovery(guess, truth)}
    if match and ctx.matcher is not None:
        result["match"] = recovery(ctx.matcher.match(states, layers, candidates, guess), truth)
    return result


def sweep(ctx: Context, build, n_test: int, codecs: Sequence[str], log) -> dict[tuple[int, str], dict[str, float]]:
    """Fixed cuts: the held-out text sent as one prompt; the prefill message carries every position at cut k."""
    prompt = ctx.test_ids[:n_test]
    truth = torch.tensor(prompt)
    results = {}
    L = ctx.config.num_hidden_layers
    for k in SWEEP_LAYERS:
        began = time.perf_counter()
        pipeline = build({k}, {L if k == L - 1 else L - 1}, "none")
        raw = record(pipeline, prompt, 1, stop_at_uplink=True).requests[-1]
        for codec in codecs:
            message = protocol.decode(raw if codec == "none" else transcode(raw, codec, ctx.hidden), ctx.hidden)
            assert message.start == 0 and message.count == len(prompt)
            layers = torch.full((len(prompt),), k)
            match = k in ctx.match_layers and codec in ("none", "int8")
            results[(k, codec)] = attack_inputs(ctx, layers, message.hidden.float(), truth, match=match)
        log(f"  cut {k:2d}: " + "  ".join(f"{c}: " + ", ".join(f"{a} {100 * v:.1f}" for a, v in results[(k, c)].items()) for c in codecs)
            + f"  ({time.perf_counter() - began:.1f} s)")
    return results


def random_splits(ctx: Context, build, first: set[int], second: set[int], codec: str, prompt_len: int, n_forced: int,
                  classifier: LayerClassifier, log) -> dict:
    """Random cuts, teacher-forced over the held-out text: layer identification and the full input attack."""
    text = ctx.test_ids[: prompt_len + n_forced]
    truth = torch.tensor(text)
    pipeline = build(first, second, codec)
    began = time.perf_counter()
    rec = record(pipeline, text[:prompt_len], n_forced + 1, forced_tokens=text[prompt_len:])
    run_seconds = time.perf_counter() - began
    true_cut = lambda step: pipeline.schedule.cuts(step)[0]  # noqa: E731
    found = exposures(hidden_messages(rec.requests, ctx.hidden), true_cut)
    learned = schedule_from_start(rec.requests[0], ctx.hidden, ctx.config.num_hidden_layers)
    from_start = sum(learned is not None and learned.cuts(e.step)[0] == e.layer for e in found) / len(found)
    guessed = {id(e): classifier.predict_message(e.states) for e in found}
    by_message = sum(guessed[id(e)] == e.layer for e in found) / len(found)
    by_position = sum(len(e.states) * (guessed[id(e)] == e.layer) for e in found) / sum(len(e.states) for e in found)
    out = {
        "positions": len(text), "messages": len(found), "run_seconds": run_seconds,
        "id_start": from_start, "id_classifier_messages": by_message, "id_classifier_positions": by_position,
        "schedule_found": learned is not None and (learned.first, learned.second, learned.seed) == (pipeline.schedule.first, pipeline.schedule.second, pipeline.schedule.seed),
        "mean_positions_per_message": sum(len(e.states) for e in found) / len(found),
    }
    layers_true, states_true = lowest_exposure(found, len(text))
    layers_first, states_first = lowest_exposure(found, len(text), first_only=True)
    layers_guess, states_guess = lowest_exposure(found, len(text), layer_of=lambda e: guessed[id(e)])
    out["lowest_layer_histogram"] = {k: int((layers_true == k).sum()) for k in sorted(first)}
    out["first_layer_histogram"] = {k: int((layers_first == k).sum()) for k in sorted(first)}
    out["attack_classifier"] = attack_inputs(ctx, layers_guess, states_guess, truth, match=False)
    out["attack_start"] = attack_inputs(ctx, layers_true, states_true, truth, match=True)
    out["attack_first_exposure"] = attack_inputs(ctx, layers_first, states_first, truth, match=False)
    gen = rec.generation
    out["edge_layers_per_position"] = gen.layer_evals["edge"] / len(text)
    out["cloud_layers_per_position"] = gen.layer_evals["cloud"] / len(text)
    log(f"  random {sorted(first)}/{sorted(second)} {codec}: {len(found)} messages, layer from START {100 * from_start:.1f}%, "
        f"classifier {100 * by_message:.1f}% of messages; lowest exposure {out['lowest_layer_histogram']}; "
        f"ridge {100 * out['attack_classifier']['ridge']:.1f}% ({run_seconds:.1f} s run)")
    # Fixed cuts on the same positions, from single prefill messages.
    for k in sorted(first):
        raw = record(build({k}, {min(second)}, "none"), text, 1, stop_at_uplink=True).requests[-1]
        message = protocol.decode(transcode(raw, codec, ctx.hidden), ctx.hidden)
        layers = torch.full((len(text),), k)
        out[f"fixed_{k}"] = attack_inputs(ctx, layers, message.hidden.float(), truth, match=k in (min(first), max(first)))
    return out


def outputs(ctx: Context, build, configs, prompt_len: int, n_new: int, log) -> list[dict]:
    """Greedy generation: how often the attacker's top-1 from the messages equals the token the edge emits."""
    prompt = ctx.test_ids[:prompt_len]
    rows = []
    L = ctx.config.num_hidden_layers
    for first, second, codec in configs:
        began = time.perf_counter()
        pipeline = build(first, second, codec)
        rec = record(pipeline, prompt, n_new)
        emitted = rec.generation.token_ids
        schedule = schedule_from_start(rec.requests[0], ctx.hidden, L)  # the eavesdropper's view of the cuts
        downlink = hidden_messages(rec.replies, ctx.hidden)
        uplink = hidden_messages(rec.requests, ctx.hidden)
        tail, full = Replay(ctx.model_dir, ctx.config, schedule, min(second)), Replay(ctx.model_dir, ctx.config, schedule, min(first))
        replay_hits = lens_hits = full_hits = 0
        for up, down in zip(uplink, downlink):
            a, b = schedule.cuts(down.step)
            token = emitted[down.step]
            replay_hits += int(tail.feed(b, down.start, down.hidden).argmax()) == token
            lens_hits += int(tail.lens(down.hidden[-1:]).argmax()) == token
            full_hits += int(full.feed(a, up.start, up.hidden).argmax()) == token
        n = len(downlink)
        gen = rec.generation
        positions = len(prompt) + len(emitted) - 1
        rows.append({
            "first": sorted(first), "second": sorted(second), "codec": codec, "tokens": n,
            "replay": replay_hits / n, "lens": lens_hits / n, "uplink_replay": full_hits / n,
            "edge_layers_per_position": gen.layer_evals["edge"] / positions,
            "cloud_layers_per_position": gen.layer_evals["cloud"] / positions,
        })
        log(f"  outputs {sorted(first)}/{sorted(second)} {codec}: replay {100 * rows[-1]['replay']:.1f}%, lens {100 * rows[-1]['lens']:.1f}%, "
            f"uplink replay {100 * rows[-1]['uplink_replay']:.1f}% ({time.perf_counter() - began:.1f} s)")
    return rows


def mitigation(ctx: Context, build, layer: int, codec: str, sigmas: Sequence[float], n_test: int, log) -> list[dict]:
    """Uplink noise: recovery at the cut against top-1 agreement with lossless (teacher-forced over the text, as one prefill)."""
    L = ctx.config.num_hidden_layers
    text = ctx.test_ids[:n_test]
    truth = torch.tensor(text)
    second = L - 1

    def run(codec_name: str, sigma: float):
        pipeline = build({layer}, {second}, codec_name)
        pipeline.edge.uplink_noise = sigma
        rec = record(pipeline, text, 1)
        up, down = hidden_messages(rec.requests, ctx.hidden)[0], hidden_messages(rec.replies, ctx.hidden)[0]
        replay = Replay(ctx.model_dir, ctx.config, pipeline.schedule, second)
        # The edge's own logits at every position: layers [second, L), norm and head on the reply (its prefill work).
        predicted = replay.feed(second, down.start, down.hidden, all_positions=True).argmax(-1)
        return up.hidden.float(), predicted

    _, reference = run("none", 0.0)
    generator = torch.Generator().manual_seed(1234)
    train = ctx.train_states[layer]
    rows = []
    for sigma in sigmas:
        began = time.perf_counter()
        states, predicted = run(codec, sigma)
        layers = torch.full((len(text),), layer)
        attacked = attack_inputs(ctx, layers, states, truth, match=True)
        # An attacker who knows sigma (the code is public) trains on noisy states.
        aware = ctx.probes if sigma == 0 else {layer: TokenProbe.fit(ctx.embeddings, add_uplink_noise(train, sigma, generator), ctx.train_tokens)}
        attacked["ridge_aware"] = attack_inputs(ctx, layers, states, truth, match=False, probes=aware)["ridge"]
        rows.append({"sigma": sigma, "agreement": recovery(predicted[:-1], reference[:-1]), **attacked})
        log(f"  sigma {sigma}: agreement {100 * rows[-1]['agreement']:.1f}%, " + ", ".join(f"{a} {100 * v:.1f}" for a, v in attacked.items())
            + f" ({time.perf_counter() - began:.1f} s)")
    return rows


# ----------------------------------------------------------------------------------------------
# Report


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def write_plots(out_dir: Path, sweep_rows, random_row, first, mitigation_rows, layer) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"nn": ("nearest neighbour", "tab:gray"), "ridge": ("ridge probe", "tab:blue"), "match": ("public-weights matcher", "tab:red")}
    for codec, line in (("none", "-"), ("int8", "--")):
        for attack, (label, color) in styles.items():
            xs = [k for k in SWEEP_LAYERS if attack in sweep_rows.get((k, codec), {})]
            if xs:
                ax.plot(xs, [100 * sweep_rows[(k, codec)][attack] for k in xs], line, marker="o", ms=3, color=color, label=f"{label} ({codec})")
    if random_row:
        ax.axhline(100 * random_row["attack_classifier"]["ridge"], color="tab:green", ls=":",
                   label=f"random cuts {{{min(first)}..{max(first)}}}: classifier + ridge")
        fixed = random_row[f"fixed_{max(first)}"]["ridge"]
        ax.plot([max(first)], [100 * fixed], marker="*", ms=11, color="tab:green", ls="none",
                label=f"fixed cut {max(first)}, same edge cost as random (ridge)")
    ax.set_xlabel("cut layer k of the edge->cloud message")
    ax.set_ylabel("input tokens recovered (%)")
    ax.set_title("Held-out input recovery from the uplink (SmolLM2-135M)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.07, 0.05))
    fig.tight_layout()
    fig.savefig(out_dir / "privacy_recovery.png", dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    agreement = [100 * r["agreement"] for r in mitigation_rows]
    for key, label, color in (("ridge", "ridge (trained clean)", "tab:blue"), ("ridge_aware", "ridge (trained on noisy states)", "tab:purple"),
                              ("match", "public-weights matcher", "tab:red"), ("nn", "nearest neighbour", "tab:gray")):
        ax.plot(agreement, [100 * r[key] for r in mitigation_rows], marker="o", color=color, label=label)
    crowded = [r["sigma"] for r, x in zip(mitigation_rows, agreement) if x >= max(agreement) - 2]
    labels = [(x, f"σ={r['sigma']:g}") for r, x in zip(mitigation_rows, agreement) if r["sigma"] not in crowded]
    labels.append((max(agreement), "σ=" + ", ".join(f"{v:g}" for v in crowded)))
    for x, text in labels:  # along the bottom, upright, clear of the curves
        ax.annotate(text, (x, 4), fontsize=7, rotation=90, ha="center", va="bottom", xytext=(-6, 0), textcoords="offset points")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("teacher-forced top-1 agreement with lossless (%)")
    ax.set_ylabel(f"input tokens recovered at layer {layer} (%)")
    ax.set_title("Uplink noise: privacy against fidelity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "privacy_fidelity.png", dpi=130)
    plt.close(fig)


def write_report(path: Path, *, machine: str, command: str, runtime: float, n_train: int, n_sweep: int, sweep_rows, codecs,
                 lambdas: dict[int, float], random_row, first, second, codec, output_rows, mitigation_rows, mit_layer,
                 mit_codec, candidates: int, num_layers: int) -> None:
    L = num_layers
    fa, fb, sa, sb = min(first), max(first), min(second), max(second)
    r = random_row
    eq = r[f"fixed_{fb}"]
    low = r[f"fixed_{fa}"]
    lines = [
        "# Privacy evaluation: what crosses the link, attacked",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Runtime: {runtime:.0f} s (CPU only, whole run)",
        "",
        "Model: the embedded SmolLM2-135M-Instruct (30 layers, hidden 576, tied embeddings). The attacker knows the public "
        "weights. Its attack models are trained only on `bench/data/train_kitchen_science.txt` and "
        f"`bench/data/train_travel_letters.txt` ({n_train} tokens of clean hidden states of the unsplit model, in chunks of "
        "256 starting at position 0); everything is scored on the disjoint held-out text `bench/data/heldout_lighthouse.txt`. "
        "Every attack reads only messages recorded on the link (a wrapper around `cloud.handle`, decoded with "
        "`protocol.decode`). Recovery = share of positions whose token id is recovered exactly.",
        "",
        "Attacks on edge->cloud states (input tokens):",
        "- **nn**: cosine nearest neighbour of the state among the 49,152 token embeddings.",
        "- **ridge**: ridge regression from the state (scaled to unit norm, then standardised) to the token's unit embedding, "
        f"then the nearest embedding over the full vocabulary; lambda from {{{', '.join(f'{v:g}' for v in LAMBDAS)}}} picked on "
        "the last 15% of the training tokens, then refitted on all.",
        f"- **match** (the stronger inverter; needs the public weights of layers 0..k-1): the ridge probe's top-{candidates} tokens "
        "at each position are run through layers 0..k-1 as that position, attending to the ridge's top-1 guesses at the earlier "
        "positions; the candidate whose layer-k state is closest to the observed one wins. With the right token and prefix the "
        "relative distance is ~1e-7, so at shallow cuts its recovery is about the ridge's top-K recall; at the deepest cut the "
        "errors of the guessed prefix dominate the distance (about 0.6 for right and wrong candidates alike) and it falls "
        "below the ridge probe. (A classifier over the tokens seen in training was not used: only 62% of the held-out tokens "
        "occur in the training texts.)",
        "",
        f"## 1. Input recovery from edge->cloud messages, fixed cuts ({n_sweep} held-out tokens)",
        "",
        f"Split first={{k}}, second={{{L - 1}}} ({{{L}}} for k = {L - 1}); the held-out text is the prompt, so the prefill message "
        "carries all its positions at cut k. Lossy columns attack the decoded lossy message: the recorded lossless message "
        "re-encoded with that codec, which at a fixed cut is byte for byte what an edge using that codec sends (`transcode`, "
        "checked against a real int8 pipeline in tests/test_privacy.py).",
        "",
        "| cut k | nn | ridge | match | nn int8 | ridge int8 | match int8 | ridge lambda |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in SWEEP_LAYERS:
        a, b = sweep_rows[(k, "none")], sweep_rows.get((k, "int8"), {})
        lines.append(f"| {k} | {pct(a['nn'])} | {pct(a['ridge'])} | {pct(a.get('match'))} | {pct(b.get('nn'))} | "
                     f"{pct(b.get('ridge'))} | {pct(b.get('match'))} | {lambdas[k]:g} |")
    lines += [
        "",
        "Ridge recovery by codec (same probes, trained on clean states):",
        "",
        "| cut k | " + " | ".join(codecs) + " |",
        "|---:|" + "---:|" * len(codecs),
    ]
    for k in SWEEP_LAYERS:
        lines.append(f"| {k} | " + " | ".join(pct(sweep_rows[(k, c)]["ridge"]) for c in codecs) + " |")
    lines += [
        "",
        "Reference figures measured before this benchmark (other probe settings): nn 100% at layer 0 and 0.7% at layer 1; ridge "
        "93.6% (1), 84.0% (2), 64.6% (4), 58.0% (8), 45.8% (15), 33.0% (29).",
        "",
    ]
    hist, first_hist = r["lowest_layer_histogram"], r["first_layer_histogram"]
    lines += [
        f"## 2. Random cuts: layer identification and the full attack (first {{{fa}..{fb}}}, second {{{sa}..{sb}}}, {codec})",
        "",
        f"Teacher-forced over the first {r['positions']} held-out tokens (a {r['positions'] - r['n_forced']}-token prompt, then "
        f"{r['n_forced']} forced tokens, one step each; schedule seed 0): {r['messages']} edge->cloud messages, "
        f"{r['mean_positions_per_message']:.2f} positions per message on average.",
        "",
        "| how the attacker names the layer of a message | messages right | positions right |",
        "|---|---:|---:|",
        f"| from the START message (seed in clear, sets from the fingerprint) | {pct(r['id_start'])} | {pct(r['id_start'])} |",
        f"| ridge classifier on state features (direction, norm, scale), without START | {pct(r['id_classifier_messages'])} | "
        f"{pct(r['id_classifier_positions'])} |",
        "| the cloud itself (it must run layers a..b-1) | 100.0 | 100.0 |",
        "",
        "Where each position crosses the link: first at the cut of the step that creates it "
        f"({', '.join(f'layer {k}: {v}' for k, v in first_hist.items())} positions), and again at a lower cut whenever a later step "
        "draws a cut at which the cloud has not yet run it, so every position is eventually sent at layer "
        f"{fa} unless the session ends first. Lowest layer at which each position crossed: "
        f"{', '.join(f'layer {k}: {v}' for k, v in hist.items())}.",
        "",
        "| split (the same held-out positions) | edge layers / position | nn | ridge | match |",
        "|---|---:|---:|---:|---:|",
        f"| random {{{fa}..{fb}}}/{{{sa}..{sb}}}: layer from the classifier, lowest exposure | {r['edge_layers_per_position']:.1f} "
        f"(measured) | {pct(r['attack_classifier']['nn'])} | {pct(r['attack_classifier']['ridge'])} | – |",
        f"| random: layer from START, lowest exposure | same | {pct(r['attack_start']['nn'])} | {pct(r['attack_start']['ridge'])} | "
        f"{pct(r['attack_start'].get('match'))} |",
        f"| random: first exposure only (an attacker ignoring re-sends) | same | {pct(r['attack_first_exposure']['nn'])} | "
        f"{pct(r['attack_first_exposure']['ridge'])} | – |",
    ]
    for k in sorted(first):
        fk = r[f"fixed_{k}"]
        lines.append(f"| fixed {{{k}}}/{{{sa}}} | {k + L - sa} | {pct(fk['nn'])} | {pct(fk['ridge'])} | {pct(fk.get('match'))} |")
    lines += [
        "",
        f"Edge cost: with per-step random cuts the edge ends up running every layer it may own, {fb} + {L} - {sa} = "
        f"{fb + L - sa} layers per position in the long run (measured over this run: {r['edge_layers_per_position']:.1f}; the "
        f"cloud {r['cloud_layers_per_position']:.1f}), the cost of the fixed split {{{fb}}}/{{{sa}}}. "
        f"**At equal edge cost the fixed cut at max(first) = {fb} protects more**: ridge {pct(eq['ridge'])}% "
        f"(matcher {pct(eq.get('match'))}%) against {pct(r['attack_classifier']['ridge'])}% (matcher "
        f"{pct(r['attack_start'].get('match'))}%) under random cuts. Random cuts are no better than the fixed cut at min(first) = {fa} "
        f"(ridge {pct(low['ridge'])}%): most positions cross at layer {fa} sooner or later, and the layer of a message is no secret "
        "(START gives it exactly, the state statistics nearly so, and the cloud must know it).",
        "",
        "## 3. Output recovery from cloud->edge messages (greedy generation)",
        "",
        f"Prompt: the first {output_rows[0]['prompt']} held-out tokens; {output_rows[0]['tokens']} greedy new tokens. Share of steps "
        "where the attacker's top-1 equals the token the edge emits.",
        "- **replay**: public layers b..L-1, final norm and head on the received states, in arrival order (what the edge runs).",
        "- **lens**: final norm and head only, on the received state (an attacker without the tail layers, e.g. private tail weights).",
        "- **uplink replay**: public layers a..L-1 on the edge->cloud states alone (an eavesdropper who never sees the downlink).",
        "",
        "| first | second | codec | replay | lens | uplink replay | edge layers / position (measured) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]

    def braces(values):
        return "{" + (f"{values[0]}..{values[-1]}" if len(values) > 1 else str(values[0])) + "}"

    for o in output_rows:
        lines.append(f"| {braces(o['first'])} | {braces(o['second'])} | {o['codec']} | {pct(o['replay'])} | {pct(o['lens'])} | "
                     f"{pct(o['uplink_replay'])} | {o['edge_layers_per_position']:.1f} |")
    lines += [
        "",
        "In greedy generation each emitted token is the next input token: whoever recovers the outputs also recovers every "
        "generated input token.",
        "",
        f"## 4. Mitigation: uplink noise (fixed cut {{{mit_layer}}}/{{{L - 1}}}, codec {mit_codec})",
        "",
        "`edge.uplink_noise = sigma` adds Gaussian noise of sigma x 1.4826 x median|h| per position to what leaves the edge. "
        f"Agreement: top-1 of the edge's logits equal to the lossless, noise-free run's, teacher-forced over the first "
        f"{mitigation_rows[0]['tokens']} predictions of the held-out text (the text sent as one prompt; the edge's own layer "
        f"{L - 1}, norm and head applied to the cloud's reply at every position, which is the edge's prefill work; checked "
        "once against step-by-step teacher forcing with `on_logits` over 120 tokens: the same agreement at sigma 0 and 0.5). "
        "`ridge aware` is trained on training states with the same noise added (the attacker knows sigma: the code is public); "
        "it did worse than the clean-trained probe (its shrinkage pulls predictions towards common directions), so the "
        "clean-trained probe and the matcher are the attackers to read.",
        "",
        "| sigma | top-1 agreement | nn | ridge | ridge aware | match |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for m in mitigation_rows:
        lines.append(f"| {m['sigma']:g} | {pct(m['agreement'])} | {pct(m['nn'])} | {pct(m['ridge'])} | {pct(m['ridge_aware'])} | "
                     f"{pct(m.get('match'))} |")
    lines += ["", "![recovery against layer](privacy_recovery.png)", "", "![privacy against fidelity](privacy_fidelity.png)", ""]
    lines += discussion(sweep_rows, random_row, first, second, output_rows, mitigation_rows, mit_layer, L)
    path.write_text("\n".join(lines) + "\n")


def discussion(sweep_rows, r, first, second, output_rows, mitigation_rows, mit_layer, L) -> list[str]:
    """The short discussion, with the figures of this run."""
    fa, fb, sa = min(first), max(first), min(second)
    ridge = {k: sweep_rows[(k, "none")]["ridge"] for k in SWEEP_LAYERS}
    match = {k: sweep_rows[(k, "none")].get("match") for k in SWEEP_LAYERS}
    int8 = {k: sweep_rows[(k, "int8")]["ridge"] for k in SWEEP_LAYERS if (k, "int8") in sweep_rows}
    replay = min(o["replay"] for o in output_rows)
    uplink = min(o["uplink_replay"] for o in output_rows)
    lens = {tuple(o["second"]): o["lens"] for o in output_rows if o["codec"] == output_rows[0]["codec"]}
    usable = [m for m in mitigation_rows if m["agreement"] >= 0.95]
    strongest = usable[-1] if usable else mitigation_rows[0]
    worst = mitigation_rows[-1]
    deepest = max(SWEEP_LAYERS)
    lens_text = ", ".join(f"{v * 100:.0f}% (second {{{k[0]}..{k[-1]}}})" if len(k) > 1 else f"{v * 100:.0f}% (b = {k[0]})"
                          for k, v in lens.items())
    return [
        "## Discussion",
        "",
        "**What is measured.** Attacks on the bytes that cross the link, with attack models trained on other text: a lower "
        "bound on what a determined attacker recovers (better probes, more training text or a language-model prior over the "
        "recovered sequence would do better, not worse).",
        "",
        "**Eavesdropper on the link.** The protocol has a CRC but no encryption or authentication, so anyone on the path sees "
        "START (with the schedule seed in clear), every edge->cloud state and every cloud->edge state. From layer-1 messages "
        f"the ridge probe recovers {ridge[1] * 100:.1f}% of held-out input tokens and the public-weights matcher "
        f"{(match[1] or 0) * 100:.1f}%; recovery falls with depth but stays far from chance (ridge {ridge[6] * 100:.1f}% at layer 6, "
        f"{ridge[deepest] * 100:.1f}% at layer {deepest}). int8 changes nothing measurable (ridge {int8.get(1, 0) * 100:.1f}% at "
        f"layer 1): compression is not protection. The downlink gives the outputs away: replaying the public tail layers "
        f"recovers {replay * 100:.0f}% of the emitted tokens, and so does replaying the uplink alone ({uplink * 100:.0f}%), "
        "which in greedy generation means every generated token. Encrypting the link (TLS, SSH tunnel, WireGuard) removes "
        "this attacker entirely and is the first thing to do; nothing in the split itself replaces it.",
        "",
        "**Honest-but-curious cloud.** Encryption does not help against the party that decrypts. The cloud sees the same states "
        "and knows every cut (it must run layers a..b-1), so everything above applies to it, and random cuts hide nothing "
        f"from it. Random cuts also cost the edge as much as a fixed cut at max(first) = {fb} while exposing nearly every "
        f"position at min(first) = {fa}: ridge {r['attack_classifier']['ridge'] * 100:.1f}% under random cuts against "
        f"{r[f'fixed_{fb}']['ridge'] * 100:.1f}% for the fixed cut {{{fb}}}/{{{sa}}}. For privacy, spend the edge's compute on "
        "a deeper fixed first cut instead. Uplink noise trades fidelity for little privacy against these attackers: at "
        f"sigma = {strongest['sigma']:g} (top-1 agreement {strongest['agreement'] * 100:.1f}%) the ridge probe still recovers "
        f"{strongest['ridge'] * 100:.1f}% and the matcher {(strongest.get('match') or 0) * 100:.1f}% at layer {mit_layer}; at "
        f"sigma = {worst['sigma']:g} agreement falls to {worst['agreement'] * 100:.1f}% while the matcher still recovers "
        f"{(worst.get('match') or 0) * 100:.1f}%.",
        "",
        "**Public against private weights.** Every number here assumes the public checkpoint, as this project uses it. The "
        "matcher and both replays need the weights of the layers around the cut; the ridge probe needs only clean states to "
        "train on, which an attacker gets by running the public model on any text. Private weights on the edge side (e.g. a "
        "LoRA-tuned first part and tail, kept on the edge) would deny the matcher and the replays; the logit lens, which needs "
        f"only the final norm and head, still names the emitted token in {lens_text} of the steps (the head is the tied embedding, which the "
        "edge keeps, but an attacker could substitute the public one). Whether probes trained on public-weight states "
        "transfer to privately tuned layers was not measured here.",
        "",
        f"**Not protected, in short:** prompt tokens (most of them at shallow cuts, {ridge[deepest] * 100:.0f}% even at layer {deepest}), "
        "generated tokens (all of them, from either direction of the link), and the split schedule. **Protected:** nothing "
        "cryptographically. The token ids, the embedding lookup and the choice of the next token stay on the edge, but the "
        "states that cross the link give most of the text back.",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-tokens", type=int, default=384, help="held-out tokens for the fixed-cut sweep and the mitigation curve")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens of the random-split run (then --forced steps)")
    parser.add_argument("--forced", type=int, default=160, help="teacher-forced steps of the random-split run")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy new tokens of the output-recovery runs")
    parser.add_argument("--candidates", type=int, default=8, help="matcher candidates per position (ridge top-K)")
    parser.add_argument("--sweep-codecs", default="none,int8,fp16,bf16,bnb8", help="codecs of the sweep (the matcher runs on none and int8)")
    parser.add_argument("--first", default="1-6")
    parser.add_argument("--second", default="24-29")
    parser.add_argument("--codec", default="int8", help="codec of the random-split and mitigation runs")
    parser.add_argument("--mitigation-layer", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine, 2 threads were up to 40x slower)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM

    from bench.common import machine, parse_list
    from src.checkpoint import load_config, load_tokenizer, resolve_model_dir
    from src.pipeline import build_pipeline
    from src.utils import log

    model_dir = resolve_model_dir(None)
    config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    first, second = parse_list(args.first), parse_list(args.second)

    def build(first_set, second_set, codec_name):
        return build_pipeline(str(model_dir), set(first_set), set(second_set), codec_name, seed=args.seed, with_tokenizer=False)

    train_ids = [t for name in TRAIN_TEXTS for t in text_ids(tokenizer, name)]
    test_ids = text_ids(tokenizer, TEST_TEXT)
    needed = set(SWEEP_LAYERS) | first | {args.mitigation_layer}
    log(f"clean training states: {len(train_ids)} tokens, layers {sorted(needed)}")
    train_states, train_tokens = clean_states(model, train_ids, needed)
    embeddings = model.model.embed_tokens.weight.detach().float()
    ctx = Context(model_dir, config, model, embeddings, train_states, train_tokens, test_ids, candidates=args.candidates)
    ctx.matcher = Matcher(model)
    for k in sorted(needed):
        ctx.probes[k] = TokenProbe.fit(embeddings, train_states[k], train_tokens)
    lambdas = {k: p.ridge.lam for k, p in ctx.probes.items()}
    log(f"probes fitted ({time.perf_counter() - began:.0f} s); lambdas {lambdas}")
    classifier = LayerClassifier(sorted(first), train_states)

    codecs = tuple(args.sweep_codecs.split(","))
    log("1. fixed-cut sweep")
    sweep_rows = sweep(ctx, build, args.sweep_tokens, codecs, log)
    log("2. random cuts")
    random_row = random_splits(ctx, build, first, second, args.codec, args.prompt, args.forced, classifier, log)
    random_row["n_forced"] = args.forced
    log("3. output recovery")
    L = config.num_hidden_layers
    configs = [({1}, {L - 1}, args.codec), ({max(first)}, {min(second)}, args.codec), (first, second, args.codec), (first, second, "none")]
    output_rows = outputs(ctx, build, configs, args.prompt, args.new_tokens, log)
    for row in output_rows:
        row["prompt"] = args.prompt
    log("4. uplink noise")
    mitigation_rows = mitigation(ctx, build, args.mitigation_layer, args.codec, SIGMAS, args.sweep_tokens, log)
    for row in mitigation_rows:
        row["tokens"] = args.sweep_tokens - 1

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plots(out_dir, sweep_rows, random_row, first, mitigation_rows, args.mitigation_layer)
    runtime = time.perf_counter() - began
    command = "python -m bench.privacy" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    write_report(
        out_dir / "privacy.md", machine=machine(), command=command.strip(), runtime=runtime, n_train=len(train_tokens),
        n_sweep=args.sweep_tokens, sweep_rows=sweep_rows, codecs=codecs, lambdas=lambdas, random_row=random_row, first=first,
        second=second, codec=args.codec, output_rows=output_rows, mitigation_rows=mitigation_rows, mit_layer=args.mitigation_layer,
        mit_codec=args.codec, candidates=args.candidates, num_layers=config.num_hidden_layers,
    )
    log(f"wrote {out_dir / 'privacy.md'} and the plots in {runtime:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
