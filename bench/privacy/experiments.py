"""The four measurements (fixed-cut sweep, random cuts, output recovery, uplink noise): each runs
pipelines, records the link and plays the attacks against what was recorded."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.privacy.attacks import LayerClassifier, Matcher, Replay, TokenProbe, add_uplink_noise, nearest_neighbour, recovery
from bench.privacy.capture import exposures, hidden_messages, lowest_exposure, record, schedule_from_start, transcode
from src.link import protocol

SWEEP_LAYERS = (0, 1, 2, 3, 4, 5, 6, 8, 15, 22, 29)
MATCH_LAYERS = (1, 2, 3, 4, 5, 6, 8, 15, 22, 29)  # cost: about K forward passes up to the cut


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
