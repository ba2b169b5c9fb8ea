"""The attacks: clean states of the public model, the probes and matcher that recover input tokens,
the layer classifier, and the replay of the public tail that recovers output tokens."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from src.schedule import SplitSchedule

DATA = Path(__file__).resolve().parent.parent / "data"
LAMBDAS = (0.1, 1.0, 10.0, 100.0)


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
