"""The command line shared by main_1_split.py, main_2_split.py and main_3_split.py."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import torch

from .pipeline import Pipeline, RemoteCloud, SideOptions, build_pipeline
from .precision import check_device, dtype_name, resolve_dtype
from .sampling import SamplingConfig, TextStream, model_generation_defaults, two_part_refusal
from .utils import OneLineParser, TriadicError, conversation_ids, format_prompt, log, parse_layer_set

MODES = {"one": "unsplit baseline", "two": "two-part split (edge -> cloud with head)", "three": "triadic split (edge -> cloud -> edge)"}


def make_parser(prog: str, mode: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=f"{MODES[mode]} of a dense decoder-only model, greedy or sampled decoding")
    parser.add_argument("--prompt", default="Tell me about Japan.")
    parser.add_argument("--prompt-format", choices=["auto", "chat", "alpaca", "raw"], default="auto", help="auto: the chat template where the tokenizer has one (raw text for the base model gemma3-270m), else Alpaca")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    add_pipeline_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON line on stdout; text goes to stderr")
    parser.add_argument("--interactive", action="store_true", help="chat in the terminal: one line in, the answer out; /reset, /exit")
    add_decoding_arguments(parser)
    return parser


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, split, codec and link flags: shared by the three scripts and the edge server (src/serve/edge_server.py)."""
    parser.add_argument("--first", help="first split layer indices, e.g. 1,2,3 (overrides the script's set)")
    parser.add_argument("--second", help="second split layer indices, e.g. 28,29 (overrides the script's set)")
    parser.add_argument("--codec", default="int8", help="link codec: int8 (default: outlier-aware, about 8 bits per value), int8-fixed, none (lossless), fp16, bf16, bnb8")
    parser.add_argument("--seed", type=int, default=0, help="shared seed of the split schedule")
    parser.add_argument("--resplit-every", type=int, default=1, help="draw new cuts every N tokens; 0 = once per request")
    parser.add_argument("--base-model", default=None, help="smollm2-135m (default) or gemma3-270m (embedded), a .gguf file, a Hugging Face folder or hub id of a dense decoder-only family")
    parser.add_argument("--lora-weights", default=None, help="PEFT LoRA adapter folder or hub id")
    parser.add_argument("--edge-device", default="cpu")
    parser.add_argument("--cloud-device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="compute dtype of both sides: auto (bfloat16 where the device computes it natively, else float32), float32, bfloat16, float16")
    parser.add_argument("--edge-dtype", default=None, help="the edge's compute dtype (overrides --dtype)")
    parser.add_argument("--cloud-dtype", default=None, help="the in-process cloud's compute dtype (overrides --dtype)")
    parser.add_argument("--load-in-8bit", action="store_true", help="8-bit weights through bitsandbytes on both sides")
    parser.add_argument("--cloud", default=None, help="grpc://host:port of a cloud server (python -m src.serve.cloud_server); "
                        "several, comma-separated, to fail over to the next mid-generation; default: in this process")
    parser.add_argument("--tls-ca", default=None, help="with --cloud: PEM CA certificate of the server (turns TLS on)")
    parser.add_argument("--tls-server-name", default=None, help="with --tls-ca: the name the server's certificate carries, where it is not the host dialled")
    parser.add_argument("--token-file", default=None, help="with --cloud: file holding the server's bearer token")
    parser.add_argument("--cloud-timeout", type=float, default=120.0, help="with --cloud: seconds to wait for each reply")
    parser.add_argument("--uplink-noise", type=float, default=0.0, help="privacy mitigation: noise (x typical |h|) on edge-to-cloud states")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding options, as transformers' generate names them (shared with tools.compare)."""
    group = parser.add_argument_group("decoding (transformers' logits processors; unset values: the model's generation_config)")
    group.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, default=None, help="at least 1e-5 when sampling; default 1.0")
    group.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens; 0: off; default 50")
    group.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; default 1.0")
    group.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p x the top probability, in [0, 1]")
    group.add_argument("--repetition-penalty", type=float, default=None, help="in [0.01, 100], 1.0 is off (CTRL's penalty)")
    group.add_argument("--sampling-seed", type=int, default=0, help="seed of the sampler (torch.manual_seed before generate); not the split schedule's --seed")
    group.add_argument("--stop", action="append", default=[], metavar="STRING", help="end when the text contains STRING (trimmed from the output); repeatable")


def sampling_from_args(args) -> SamplingConfig:
    """The options as given (validated: one line on a bad value); resolve against the model before use."""
    return SamplingConfig(args.do_sample, args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty, args.sampling_seed)


def resolve_sets(mode: str, args, first: set[int] | None, second: set[int] | None, num_layers: int) -> tuple[set[int], set[int]]:
    """The script's sets, overridden by --first/--second; the baseline and two-part modes pin what they must."""
    first = parse_layer_set(args.first, "--first") if args.first is not None else first
    second = parse_layer_set(args.second, "--second") if args.second is not None else second
    if mode == "one":
        first = first if args.first is not None else {num_layers}
        second = second if args.second is not None else first
    elif mode == "two":
        if args.second is not None and second != {num_layers}:
            log(f"note: the two-part split runs the cloud to the last layer; --second {args.second} is ignored")
        second = {num_layers}
    if first is None or second is None:  # the scripts state what the baseline and the two-part split leave out
        raise TriadicError("no split sets: give --first and --second")
    if mode == "one" and (len(first) != 1 or first != second):
        raise TriadicError("main_1_split.py runs unsplit: --first and --second must be one and the same index")
    return first, second


def run(mode: str, first: set[int] | None, second: set[int] | None, argv: list[str] | None = None) -> int:
    prog = {"one": "main_1_split.py", "two": "main_2_split.py", "three": "main_3_split.py"}[mode]
    args = make_parser(prog, mode).parse_args(argv)
    try:
        return _run(mode, args, first, second)
    except TriadicError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


# The flags of the link to a remote cloud: --cloud and those that only mean something with it.
LINK_FLAGS = ("cloud", "tls_ca", "token_file", "tls_server_name")


def baseline_args(args: argparse.Namespace) -> argparse.Namespace:
    """The same flags for the unsplit baseline (as main_1_split.py runs): no sets, no link, no uplink noise."""
    return argparse.Namespace(**{**vars(args), "first": None, "second": None, "uplink_noise": 0.0, **dict.fromkeys(LINK_FLAGS)})


def build_from_args(mode: str, args, first: set[int] | None, second: set[int] | None) -> Pipeline:
    """Check the pipeline flags of `add_pipeline_arguments` and build the pipeline they name."""
    from .checkpoint import load_config, resolve_model_dir
    from .link.codec import get_codec

    get_codec(args.codec)
    if not 0 <= args.uplink_noise < math.inf:  # also refuses NaN
        raise TriadicError(f"--uplink-noise {args.uplink_noise}: must be finite and >= 0")
    check_device(args.edge_device, "--edge-device")
    check_device(args.cloud_device, "--cloud-device")
    if args.cloud is None and any(getattr(args, name) for name in LINK_FLAGS):
        raise TriadicError("--tls-ca, --tls-server-name and --token-file go with --cloud")
    if args.cloud is not None and mode == "one":
        raise TriadicError("--cloud: main_1_split.py runs unsplit, without a cloud")
    edge_dtype, _ = resolve_dtype(args.edge_dtype or args.dtype, args.edge_device)
    cloud_dtype, _ = resolve_dtype(args.cloud_dtype or args.dtype, args.cloud_device)
    model_dir = str(resolve_model_dir(args.base_model))  # once: a hub id is downloaded here, not again below
    num_layers = load_config(model_dir).num_hidden_layers
    first, second = resolve_sets(mode, args, first, second, num_layers)
    edge_side = SideOptions(args.edge_device, edge_dtype, args.load_in_8bit)
    cloud_side = SideOptions(args.cloud_device, cloud_dtype, args.load_in_8bit)
    torch.manual_seed(0)
    pipeline = build_pipeline(
        # The unsplit baseline sends nothing, so it computes as a lossless run does: transformers' layout, HF's products.
        model_dir, first, second, "none" if mode == "one" else args.codec, args.seed, args.resplit_every, two_part=mode == "two",
        lora_weights=args.lora_weights, edge_side=edge_side, cloud_side=cloud_side,
        remote=RemoteCloud(args.cloud, args.tls_ca, args.token_file, args.cloud_timeout, args.tls_server_name) if args.cloud is not None else None,
    )
    pipeline.edge.uplink_noise = args.uplink_noise
    return pipeline


def _run(mode: str, args, first: set[int] | None, second: set[int] | None) -> int:
    from .checkpoint import default_prompt_format

    if args.max_new_tokens < 1:
        raise TriadicError("--max-new-tokens must be at least 1")
    sampling = sampling_from_args(args)
    TextStream(None, args.stop)  # refuses an empty stop string before any weights load
    pipeline = build_from_args(mode, args, first, second)
    generation = model_generation_defaults(pipeline.model_dir)
    asked, sampling = sampling, sampling.resolved(generation)
    if pipeline.edge.third is None and sampling.edge_only:
        raise TriadicError(two_part_refusal(sampling, asked, f"{pipeline.model_dir}/generation_config.json"))
    eos = eos_token_ids(pipeline.tokenizer, pipeline.config, generation)
    prompt_format = args.prompt_format
    if prompt_format == "auto":  # an embedded base model is prompted with raw text, not a chat template
        prompt_format = default_prompt_format(pipeline.model_dir) or "auto"
    decoding = "greedy" if not sampling.do_sample else f"sampling (seed {sampling.seed})"
    dtypes, reason = describe_dtypes(args, pipeline)
    shown_dtype = dtypes["edge"] if dtypes["cloud"] in (None, dtypes["edge"]) else f"{dtypes['edge']} (edge), {dtypes['cloud']} (cloud)"
    log(f"[{MODES[mode]}] first={sorted(pipeline.schedule.first)} second={sorted(pipeline.schedule.second)} "
        f"codec={pipeline.edge.codec.name} dtype={shown_dtype} ({reason}) seed={args.seed} {decoding}")
    try:
        with pipeline.edge.session() as chat:
            if args.interactive:
                _chat_loop(mode, args, pipeline, chat, sampling, eos, prompt_format)
            else:
                prompt_ids = format_prompt(pipeline.tokenizer, args.prompt, prompt_format)
                _answer(mode, args, pipeline, chat, prompt_ids, sampling, eos)
    finally:
        close = getattr(pipeline.edge.link, "close", None)
        if close is not None:  # the channel goes with the process
            close()
    return 0


def _answer(mode: str, args, pipeline, chat, token_ids: list[int], sampling: SamplingConfig, eos: list[int]) -> str:
    """One request through the session: stream the text, report, return the (stop-trimmed) text."""
    out = sys.stderr if args.json else sys.stdout
    stream = TextStream(pipeline.tokenizer, args.stop, write=lambda text: (out.write(text), out.flush()))
    try:
        result = chat.generate(token_ids, args.max_new_tokens, eos, on_token=stream.add, sampling=sampling)
    except BaseException:
        if stream.shown:  # the error line starts on a line of its own, not glued to the streamed text
            out.write("\n")
            out.flush()
        raise
    text = stream.finish()
    out.write("\n")
    out.flush()
    report = _report(mode, args, pipeline, result, text, sampling)
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        log(f"[{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tokens/s, "
            f"{result.bytes_up} bytes up, {result.bytes_down} bytes down]")
        if report["failovers"]:
            log(f"[{report['failovers']} failovers, {report['replayed_bytes']} bytes replayed]")
    return text


def _chat_loop(mode: str, args, pipeline, chat, sampling: SamplingConfig, eos: list[int], prompt_format: str) -> None:
    """--interactive: each line is a user turn; the session keeps both sides' caches between turns."""
    messages: list[dict[str, str]] = []
    log("interactive: type a message; /reset starts a new conversation, /exit (or end of input) quits")
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages.clear()
            chat.reset()
            log("(new conversation)")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        try:
            ids = conversation_ids(pipeline.tokenizer, messages, prompt_format)
            text = _answer(mode, args, pipeline, chat, ids, sampling, eos)
        except TriadicError as error:  # say so and go on with a fresh session: no state half-updated
            log(f"error: {error}")
            messages.pop()
            chat.reset()
            continue
        messages.append({"role": "assistant", "content": text})


def _report(mode: str, args, pipeline, result, text: str, sampling: SamplingConfig) -> dict:
    steps = max(1, len(result.token_ids))
    new_positions = len(result.prompt_token_ids) - result.cached_positions + steps - 1
    dtypes, dtype_reason = describe_dtypes(args, pipeline)
    return {
        "text": text,
        "prompt_token_ids": result.prompt_token_ids,
        "token_ids": result.token_ids,
        "cached_positions": result.cached_positions,
        "splits": [list(pair) for pair in result.splits],
        "bytes_up": result.bytes_up,
        "bytes_down": result.bytes_down,
        "positions_up": result.positions_up,
        "positions_down": result.positions_down,
        "messages_up": result.messages_up,
        "messages_down": result.messages_down,
        "mean_positions_per_message_up": result.positions_up / max(1, result.messages_up),
        "mean_positions_per_message_down": result.positions_down / max(1, result.messages_down),
        "layer_evals": result.layer_evals,
        "layer_evals_per_position": {k: v / max(1, new_positions) for k, v in result.layer_evals.items()},
        "tokens_per_second": result.tokens_per_second,
        "link_seconds": result.link_seconds,
        "failovers": getattr(pipeline.edge.link, "failovers", 0),  # clouds that failed mid-generation and were replaced
        "replayed_bytes": getattr(pipeline.edge.link, "replayed_bytes", 0),  # uplink bytes sent again to the replacements
        "mode": mode,
        "codec": pipeline.edge.codec.name,
        "dtype": dtypes,
        "dtype_reason": dtype_reason,
        "seed": args.seed,
        "resplit_every": args.resplit_every,
        "sampling": dataclasses.asdict(sampling),
        "stop": args.stop,
        "first": sorted(pipeline.schedule.first),
        "second": sorted(pipeline.schedule.second),
        "model": str(pipeline.model_dir),
    }


def describe_dtypes(args, pipeline: Pipeline) -> tuple[dict[str, str | None], str]:
    """The compute dtype of each side this process runs, and why (--dtype auto's choice, or the flag)."""
    edge_dtype, edge_reason = resolve_dtype(args.edge_dtype or args.dtype, args.edge_device)
    cloud_dtype, cloud_reason = resolve_dtype(args.cloud_dtype or args.dtype, args.cloud_device)
    in_process_cloud = pipeline.cloud is not None
    dtypes = {"edge": dtype_name(edge_dtype), "cloud": dtype_name(cloud_dtype) if in_process_cloud else None}
    return dtypes, "; ".join(sorted({edge_reason} | ({cloud_reason} if in_process_cloud else set())))


def eos_token_ids(tokenizer, config, generation=None) -> list[int]:
    """The ids that end a generation: generation_config.json's (`generation`, from `model_generation_defaults`: what
    `generate` stops on; Llama 3 Instruct lists <|eot_id|> there, not in config.json), the config's and the tokenizer's."""
    ids: list[int] = []
    for source, more in (("generation_config.json", getattr(generation, "eos_token_id", None)),
                         ("config.json", config.eos_token_id), ("tokenizer", tokenizer.eos_token_id if tokenizer is not None else None)):
        listed = [more] if more is None or isinstance(more, int) else more
        if not isinstance(listed, list) or not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in listed):
            raise TriadicError(f"the model's {source}: eos_token_id must be a token id or a list of token ids, not {more!r:.60}")
        for id_ in listed:
            if id_ is not None and id_ not in ids:
                ids.append(id_)
    return ids
