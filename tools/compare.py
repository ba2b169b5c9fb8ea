"""Compare responses across split settings and codecs against the unsplit baseline (HF generate).

    python -m tools.compare --prompts bench/data/prompts.txt --settings "1/29,4/26,1-6/24-29" \
        --codecs none,int8 [--base-model ...] [--do-sample --temperature 0.7 ...] --out results/compare

The model is read once: transformers loads it for the baseline (`generate`), and every setting's
edge and cloud take their tensors from that copy (`checkpoint.weights_in_memory`). Each prompt runs
the baseline, then every setting x codec through the real pipeline (edge, cloud, bytes between them),
with the same decoding options and sampling seed. Writes `<out>.md` (a summary, then per prompt each
response beside the baseline's: same or not, the first differing token, bytes per token, tokens/s)
and `<out>.jsonl` (one line per run).

Settings, comma-separated: `A/B` with sets written as `1-6` (a range), `1+3+5` (a union) or `L` (the
number of layers): `1/29`, `1-6/24-29`, `L/L` (unsplit, also `unsplit`); `two:A` is the two-part
split with the first cut drawn from A. Settings without a cloud run once, whatever the codecs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from src.sampling import SamplingConfig, TextStream, model_generation_defaults, two_part_refusal
from src.utils import OneLineParser, TriadicError, first_line, format_prompt, read_file

PROG = "tools.compare"
BASELINE = "HF generate"


@dataclass(frozen=True)
class Setting:
    """One split configuration to compare."""

    label: str  # as written on the command line
    first: tuple[int, ...]  # the first cut's set
    second: tuple[int, ...]  # the second cut's set
    two_part: bool = False  # the cloud runs to the end and returns the token

    def needs_cloud(self) -> bool:
        return min(self.first) < max(self.second)


@dataclass
class Run:
    """One response: the baseline's (setting BASELINE) or one setting x codec's."""

    prompt_index: int
    setting: str
    codec: str
    token_ids: list[int]
    text: str
    seconds: float
    bytes_up: int = 0
    bytes_down: int = 0
    same: bool = True  # token for token the baseline's
    first_difference: int | None = None  # index of the first token that differs from the baseline's
    splits: list[tuple[int, int]] = field(default_factory=list)

    @property
    def bytes_per_token(self) -> float:
        return (self.bytes_up + self.bytes_down) / max(1, len(self.token_ids))

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


def parse_settings(text: str, num_layers: int) -> list[Setting]:
    """The --settings list; an unknown or malformed setting is a one-line TriadicError."""
    from src.utils import validate_split_sets

    settings = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item == "unsplit":
            first = second = f"{num_layers}"
            two_part = False
        elif item.startswith("two:"):
            first, second, two_part = item[4:], "L", True
        elif item.count("/") == 1:
            first, second = item.split("/")
            two_part = False
        else:
            raise TriadicError(f"--settings: {item!r} is not a setting (A/B, e.g. 1/29 or 1-6/24-29; two:A; unsplit)")
        first_set, second_set = (_parse_set(part, item, num_layers) for part in (first, second))
        try:
            first_sorted, second_sorted = validate_split_sets(first_set, second_set, num_layers)
        except TriadicError as error:
            raise TriadicError(f"--settings {item}: {error}") from None
        if two_part and first_sorted[-1] == num_layers:
            raise TriadicError(f"--settings {item}: the two-part split needs a first cut below {num_layers}")
        settings.append(Setting(item, first_sorted, second_sorted, two_part))
    if not settings:
        raise TriadicError("--settings: no setting given")
    return settings


def _parse_set(text: str, item: str, num_layers: int) -> set[int]:
    """'1-6+8+L' as {1, ..., 6, 8, L}: ASCII digits only, every index within 0..L before a range is expanded (a typo such as
    1-99999999999 once filled the machine's memory before the indices were checked)."""
    values: set[int] = set()
    for piece in text.split("+"):
        piece = piece.strip()
        found = re.fullmatch(r"([0-9]{1,18})(?:-([0-9]{1,18}))?", piece)
        if piece == "L":
            lo = hi = num_layers
        elif found is not None and int(found[1]) <= int(found[2] or found[1]):
            lo, hi = int(found[1]), int(found[2] or found[1])
        else:
            raise TriadicError(f"--settings {item}: {piece!r} is not a layer index or range (e.g. 4, 1-6, L)")
        if hi > num_layers:
            raise TriadicError(f"--settings {item}: layer {hi} is beyond this model's {num_layers} layers (0 to {num_layers})")
        values.update(range(lo, hi + 1))
    return values


def read_prompts(path: str) -> list[str]:
    """One instruction per line; blank lines and '#' comments skipped. Unreadable or empty: one line."""
    try:
        text = read_file(path, "--prompts").decode("utf-8")
    except UnicodeDecodeError:
        raise TriadicError(f"--prompts {path}: not UTF-8 text") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise TriadicError(f"--prompts {path}: no prompts in the file")
    return prompts


@dataclass(frozen=True)
class CompareConfig:
    """What one comparison runs."""

    model_dir: str  # the model folder (resolved)
    prompts: tuple[str, ...]  # instructions, formatted with prompt_format
    settings: tuple[Setting, ...]
    codecs: tuple[str, ...]
    sampling: SamplingConfig = SamplingConfig()  # as given; unset options resolve as generate resolves them
    max_new_tokens: int = 64
    prompt_format: str = "auto"
    stop: tuple[str, ...] = ()  # stop strings, as --stop
    schedule_seed: int = 0  # the split schedule's seed (moving cuts)


def compare(config: CompareConfig, progress: bool = True) -> list[Run]:
    """The baseline and every setting x codec on every prompt; the baseline's run comes first per prompt."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from src.checkpoint import load_tokenizer, weights_in_memory
    from src.link.codec import get_codec
    from src.pipeline import build_pipeline

    tokenizer = load_tokenizer(Path(config.model_dir))
    model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    generation = model_generation_defaults(config.model_dir)
    sampling = config.sampling.resolved(generation)
    eos = _required_eos_ids(tokenizer, model.config, generation)
    prompt_ids = [format_prompt(tokenizer, prompt, config.prompt_format) for prompt in config.prompts]
    jobs = [(s, c) for s in config.settings for c in (config.codecs if s.needs_cloud() else ("-",))]
    bar = tqdm(total=len(prompt_ids) * (1 + len(jobs)), desc="runs", unit="run", disable=not progress, file=sys.stderr)
    runs: list[Run] = []
    with weights_in_memory(Path(config.model_dir), model.state_dict()):
        pipelines = {
            s.label: build_pipeline(config.model_dir, set(s.first), set(s.second), "none", config.schedule_seed,
                                    two_part=s.two_part, with_tokenizer=False)
            for s in config.settings
        }
        for index, ids in enumerate(prompt_ids):
            baseline = _baseline(model, tokenizer, ids, config, eos, index)
            runs.append(baseline)
            bar.update()
            for setting, codec in jobs:
                edge = pipelines[setting.label].edge
                edge.codec = get_codec(codec if codec != "-" else "none")
                stream = TextStream(tokenizer, config.stop)
                began = time.perf_counter()
                result = edge.generate(ids, config.max_new_tokens, eos, on_token=stream.add, sampling=sampling)
                run = Run(index, setting.label, codec, result.token_ids, stream.finish(), time.perf_counter() - began,
                          result.bytes_up, result.bytes_down, splits=result.splits)
                run.first_difference = _first_difference(run.token_ids, baseline.token_ids)
                run.same = run.first_difference is None
                runs.append(run)
                bar.update()
    bar.close()
    return runs


def _baseline(model, tokenizer, ids: list[int], config: CompareConfig, eos: list[int], index: int) -> Run:
    """Unsplit transformers generate, with only the options the user set (generate resolves the rest itself)."""
    options = {name: getattr(config.sampling, name) for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
    options = {name: value for name, value in options.items() if value is not None}
    stream = TextStream(tokenizer, config.stop)  # the answer's text, and --stop by the split's rule
    tensor = torch.tensor([ids])
    began = time.perf_counter()
    if config.sampling.do_sample:
        torch.manual_seed(config.sampling.seed)
    try:
        with torch.no_grad():  # an all-ones mask: generate would otherwise mask prompt tokens equal to the pad id
            out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=config.max_new_tokens,
                                 do_sample=config.sampling.do_sample, eos_token_id=eos, pad_token_id=eos[0],
                                 stopping_criteria=_splits_stop_rule(stream, len(ids)), **options)
    except (ValueError, TypeError, RuntimeError, ArithmeticError, IndexError) as error:  # e.g. a file's integer penalty
        raise TriadicError(f"the baseline, transformers' generate, refused this model's options: {first_line(error)}") from None
    return Run(index, BASELINE, "-", out[0, len(ids):].tolist(), stream.finish(), time.perf_counter() - began)


def _splits_stop_rule(stream: TextStream, prompt_length: int):
    """`--stop` for generate by the split's own rule (`TextStream`: the answer's text, special tokens skipped, as
    vLLM matches), so that a difference in the table is the split's, not the two stop rules'. transformers'
    `stop_strings` also match across the prompt's end and in special tokens' text."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class SplitsStopRule(StoppingCriteria):
        def __init__(self) -> None:
            self.seen = prompt_length

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            for token in input_ids[0, self.seen:].tolist():
                stream.add(token)
            self.seen = input_ids.shape[1]
            return torch.full((input_ids.shape[0],), stream.stopped, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([SplitsStopRule()])


def _first_difference(tokens: list[int], reference: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(tokens, reference)):
        if x != y:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def _required_eos_ids(tokenizer, config, generation) -> list[int]:
    from src.cli import eos_token_ids

    ids = eos_token_ids(tokenizer, config, generation)
    if not ids:
        raise TriadicError("the model names no EOS token")
    return ids


# -- report ------------------------------------------------------------------------------------
def _cell(text: str, limit: int = 400) -> str:
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ⏎ ")


def _difference(run: Run, baseline: Run, tokenizer) -> str:
    if run.first_difference is None:
        return ""
    i = run.first_difference
    ours = repr(tokenizer.decode([run.token_ids[i]])) if i < len(run.token_ids) else "(end)"
    theirs = repr(tokenizer.decode([baseline.token_ids[i]])) if i < len(baseline.token_ids) else "(end)"
    return _cell(f"{i}: {ours} vs {theirs}")


def render_markdown(config: CompareConfig, runs: list[Run], tokenizer) -> str:
    baselines = {run.prompt_index: run for run in runs if run.setting == BASELINE}
    others = [run for run in runs if run.setting != BASELINE]
    decoding = "greedy" if not config.sampling.do_sample else f"sampling {asdict(config.sampling)}"
    lines = [
        "# Responses across splits and codecs, against unsplit `generate`\n",
        f"Model `{Path(config.model_dir).name}`, {len(config.prompts)} prompts, {config.max_new_tokens} new tokens at most, "
        f"{decoding}, schedule seed {config.schedule_seed}" + (f", stop strings {list(config.stop)}" if config.stop else "") + ".\n",
        "| setting | codec | same tokens as generate | bytes / token | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for label, codec in dict.fromkeys((run.setting, run.codec) for run in others):
        group = [run for run in others if (run.setting, run.codec) == (label, codec)]
        same = sum(run.same for run in group)
        lines.append(f"| {label} | {codec} | {same}/{len(group)} | {sum(r.bytes_per_token for r in group) / len(group):.1f} | "
                     f"{sum(r.tokens_per_second for r in group) / len(group):.1f} |")
    for index, prompt in enumerate(config.prompts):
        baseline = baselines[index]
        lines += [
            f"\n## {index + 1}. {_cell(prompt, 200)}\n",
            "| setting | codec | same | first difference | bytes / token | tokens/s | response |",
            "|---|---|---|---|---|---|---|",
            f"| {BASELINE} | - | | | 0 | {baseline.tokens_per_second:.1f} | {_cell(baseline.text)} |",
        ]
        for run in (r for r in others if r.prompt_index == index):
            lines.append(f"| {run.setting} | {run.codec} | {'yes' if run.same else '**no**'} | {_difference(run, baseline, tokenizer)} | "
                         f"{run.bytes_per_token:.1f} | {run.tokens_per_second:.1f} | {_cell(run.text)} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, config: CompareConfig, runs: list[Run], tokenizer) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown, jsonl = out.with_suffix(".md"), out.with_suffix(".jsonl")
    markdown.write_text(render_markdown(config, runs, tokenizer))
    with jsonl.open("w") as f:
        for run in runs:
            record = asdict(run) | {"prompt": config.prompts[run.prompt_index], "bytes_per_token": run.bytes_per_token,
                                    "tokens_per_second": run.tokens_per_second}
            f.write(json.dumps(record) + "\n")
    return markdown, jsonl


# -- command line ------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    from src.cli import add_decoding_arguments

    parser = OneLineParser(prog=PROG, description="Compare responses across split settings and codecs against unsplit generate.")
    parser.add_argument("--prompts", required=True, help="file with one instruction per line (e.g. bench/data/prompts.txt)")
    parser.add_argument("--settings", default="1/29,4/26,1-6/24-29", help="comma-separated A/B settings (see the module's doc)")
    parser.add_argument("--codecs", default="none,int8", help="comma-separated link codecs")
    parser.add_argument("--base-model", default=None, help="model folder or hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-format", choices=["auto", "chat", "alpaca", "raw"], default="auto")
    parser.add_argument("--seed", type=int, default=0, help="the split schedule's seed (moving cuts)")
    parser.add_argument("--out", default="results/compare", help="output path without suffix: writes .md and .jsonl")
    add_decoding_arguments(parser)
    return parser


def config_from_args(args) -> CompareConfig:
    """Everything checked before the model loads; one-line TriadicError on bad input."""
    from src.checkpoint import default_prompt_format, load_config, resolve_model_dir
    from src.cli import sampling_from_args
    from src.link.codec import get_codec

    if args.max_new_tokens < 1:
        raise TriadicError("--max-new-tokens must be at least 1")
    prompts = read_prompts(args.prompts)
    codecs = tuple(c.strip() for c in args.codecs.split(",") if c.strip())
    if not codecs:
        raise TriadicError("--codecs: no codec given")
    for codec in codecs:
        get_codec(codec)
    sampling = sampling_from_args(args)
    TextStream(None, args.stop)
    model_dir = resolve_model_dir(args.base_model)
    settings = parse_settings(args.settings, load_config(model_dir).num_hidden_layers)
    resolved = sampling.resolved(model_generation_defaults(model_dir))  # refuses what the split cannot apply, before any run
    if resolved.edge_only and any(s.two_part for s in settings):
        raise TriadicError(two_part_refusal(resolved, sampling, f"{model_dir}/generation_config.json"))
    prompt_format = args.prompt_format
    if prompt_format == "auto":  # an embedded base model is prompted with raw text
        prompt_format = default_prompt_format(model_dir) or "auto"
    return CompareConfig(str(model_dir), tuple(prompts), tuple(settings), codecs, sampling, args.max_new_tokens,
                         prompt_format, tuple(args.stop), args.seed)


def checked_out(out: str) -> Path:
    """The --out path with its folder made and writable: checked before any run, so that no run is lost to it."""
    path = Path(out)
    if not path.name or out.endswith(("/", os.sep)) or path.is_dir():
        raise TriadicError(f"--out {out!r}: give a path without suffix (it writes <out>.md and <out>.jsonl), not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TriadicError(f"--out {out}: cannot make its folder {path.parent}: {error.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise TriadicError(f"--out {out}: its folder {path.parent} is not writable")
    return path


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        out = checked_out(args.out)
        config = config_from_args(args)
        torch.manual_seed(0)
        runs = compare(config)
        from src.checkpoint import load_tokenizer

        try:
            markdown, jsonl = write_results(out, config, runs, load_tokenizer(Path(config.model_dir)))
        except OSError as error:  # the folder was checked; a full disk, say, is still possible
            raise TriadicError(f"--out {args.out}: cannot write the results: {error.strerror}") from None
    except TriadicError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    others = [run for run in runs if run.setting != BASELINE]
    print(f"{sum(r.same for r in others)}/{len(others)} runs gave generate's tokens; wrote {markdown} and {jsonl}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
