"""The outputs of a run: the two plots and results/privacy.md, with its discussion written from the
figures of the run."""
from __future__ import annotations

from pathlib import Path

from bench.privacy.attacks import LAMBDAS
from bench.privacy.experiments import SWEEP_LAYERS


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
