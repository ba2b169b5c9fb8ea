"""The command line shared by main_1_split.py, main_2_split.py and main_3_split.py."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .pipeline import SideOptions, build_pipeline
from .precision import dtype_name, resolve_dtype
from .utils import OneLineParser, TriadicError, format_prompt, log, parse_layer_set

MODES = {"one": "unsplit baseline", "two": "two-part split (edge -> cloud with head)", "three": "triadic split (edge -> cloud -> edge)"}


def make_parser(prog: str, mode: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=f"{MODES[mode]} of a LLaMA-family model, greedy decoding")
    parser.add_argument("--prompt", default="Tell me about Japan.")
    parser.add_argument("--prompt-format", choices=["auto", "chat", "alpaca", "raw"], default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--first", help="first split layer indices, e.g. 1,2,3 (overrides the script's set)")
    parser.add_argument("--second", help="second split layer indices, e.g. 28,29 (overrides the script's set)")
    parser.add_argument("--codec", default="int8", help="link codec: int8 (default: outlier-aware, about 8 bits per value), int8-fixed, none (lossless), fp16, bf16, bnb8")
    parser.add_argument("--seed", type=int, default=0, help="shared seed of the split schedule")
    parser.add_argument("--resplit-every", type=int, default=1, help="draw new cuts every N tokens; 0 = once per request")
    parser.add_argument("--base-model", default=None, help="LLaMA-family folder or hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--lora-weights", default=None, help="PEFT LoRA adapter folder or hub id")
    parser.add_argument("--edge-device", default="cpu")
    parser.add_argument("--cloud-device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="compute dtype of both sides: auto (bfloat16 where the device computes it natively, else float32), float32, bfloat16, float16")
    parser.add_argument("--edge-dtype", default=None, help="the edge's compute dtype (overrides --dtype)")
    parser.add_argument("--cloud-dtype", default=None, help="the in-process cloud's compute dtype (overrides --dtype)")
    parser.add_argument("--load-in-8bit", action="store_true", help="8-bit weights through bitsandbytes on both sides")
    parser.add_argument("--cloud", default=None, help="grpc://host:port of a cloud server (python -m src.cloud_server); default: in this process")
    parser.add_argument("--tls-ca", default=None, help="with --cloud: PEM CA certificate of the server (turns TLS on)")
    parser.add_argument("--token-file", default=None, help="with --cloud: file holding the server's bearer token")
    parser.add_argument("--cloud-timeout", type=float, default=120.0, help="with --cloud: seconds to wait for each reply")
    parser.add_argument("--uplink-noise", type=float, default=0.0, help="privacy mitigation: noise (x typical |h|) on edge-to-cloud states")
    parser.add_argument("--json", action="store_true", help="print one JSON line on stdout; text goes to stderr")
    return parser


def resolve_sets(mode: str, args, first: set[int] | None, second: set[int] | None, num_layers: int) -> tuple[set[int], set[int]]:
    """The script's sets, overridden by --first/--second; the baseline and two-part modes pin what they must."""
    first = parse_layer_set(args.first, "--first") if args.first is not None else first
    second = parse_layer_set(args.second, "--second") if args.second is not None else second
    if mode == "one":
        first = first if args.first is not None else {num_layers}
        second = second if args.second is not None else first
        if len(first) != 1 or first != second:
            raise TriadicError("main_1_split.py runs unsplit: --first and --second must be one and the same index")
    elif mode == "two":
        if args.second is not None and second != {num_layers}:
            log(f"note: the two-part split runs the cloud to the last layer; --second {args.second} is ignored")
        second = {num_layers}
    return first, second


def run(mode: str, first: set[int] | None, second: set[int] | None, argv: list[str] | None = None) -> int:
    prog = {"one": "main_1_split.py", "two": "main_2_split.py", "three": "main_3_split.py"}[mode]
    args = make_parser(prog, mode).parse_args(argv)
    try:
        return _run(mode, args, first, second)
    except TriadicError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


def _run(mode: str, args, first: set[int] | None, second: set[int] | None) -> int:
    from .checkpoint import load_config, resolve_model_dir
    from .codec import get_codec

    if args.max_new_tokens < 1:
        raise TriadicError("--max-new-tokens must be at least 1")
    if args.resplit_every < 0:
        raise TriadicError("--resplit-every must be >= 0")
    get_codec(args.codec)
    if args.uplink_noise < 0:
        raise TriadicError("--uplink-noise must be >= 0")
    if args.cloud is None and (args.tls_ca or args.token_file):
        raise TriadicError("--tls-ca and --token-file go with --cloud")
    if args.cloud is not None and mode == "one":
        raise TriadicError("--cloud: main_1_split.py runs unsplit, without a cloud")
    edge_dtype, edge_reason = resolve_dtype(args.edge_dtype or args.dtype, args.edge_device)
    cloud_dtype, cloud_reason = resolve_dtype(args.cloud_dtype or args.dtype, args.cloud_device)
    model_dir = str(resolve_model_dir(args.base_model))  # once: a hub id is downloaded here, not again below
    num_layers = load_config(model_dir).num_hidden_layers
    first, second = resolve_sets(mode, args, first, second, num_layers)
    edge_side = SideOptions(args.edge_device, edge_dtype, args.load_in_8bit)
    cloud_side = SideOptions(args.cloud_device, cloud_dtype, args.load_in_8bit)
    torch.manual_seed(0)
    pipeline = build_pipeline(
        model_dir, first, second, args.codec, args.seed, args.resplit_every, two_part=mode == "two",
        lora_weights=args.lora_weights, edge_side=edge_side, cloud_side=cloud_side,
        cloud_url=args.cloud, tls_ca_path=args.tls_ca, token_file_path=args.token_file, timeout=args.cloud_timeout,
    )
    pipeline.edge.uplink_noise = args.uplink_noise
    tokenizer = pipeline.tokenizer
    prompt_ids = format_prompt(tokenizer, args.prompt, args.prompt_format)
    in_process_cloud = pipeline.cloud is not None
    dtypes = {"edge": dtype_name(edge_dtype), "cloud": dtype_name(cloud_dtype) if in_process_cloud else None}
    shown_dtype = dtypes["edge"] if dtypes["cloud"] in (None, dtypes["edge"]) else f"{dtypes['edge']} (edge), {dtypes['cloud']} (cloud)"
    reasons = sorted({edge_reason} | ({cloud_reason} if in_process_cloud else set()))
    log(f"[{MODES[mode]}] first={sorted(pipeline.schedule.first)} second={sorted(pipeline.schedule.second)} "
        f"codec={args.codec} dtype={shown_dtype} ({'; '.join(reasons)}) seed={args.seed} prompt={len(prompt_ids)} tokens")

    out = sys.stderr if args.json else sys.stdout
    generated: list[int] = []
    shown = ""

    def stream(token: int) -> None:
        nonlocal shown
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text

    eos = _eos_ids(tokenizer, pipeline.config)
    try:
        result = pipeline.edge.generate(prompt_ids, args.max_new_tokens, eos, on_token=stream)
    finally:
        close = getattr(pipeline.edge.link, "close", None)
        if close is not None:  # a remote session is freed at once
            close()
    out.write("\n")
    text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    steps = max(1, len(result.token_ids))
    report = {
        "text": text,
        "prompt_token_ids": result.prompt_token_ids,
        "token_ids": result.token_ids,
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
        "layer_evals_per_position": {k: v / (len(prompt_ids) + steps - 1) for k, v in result.layer_evals.items()},
        "tokens_per_second": result.tokens_per_second,
        "link_seconds": result.link_seconds,
        "mode": mode,
        "codec": args.codec,
        "dtype": dtypes,
        "dtype_reason": "; ".join(reasons),
        "seed": args.seed,
        "resplit_every": args.resplit_every,
        "first": sorted(pipeline.schedule.first),
        "second": sorted(pipeline.schedule.second),
        "model": str(pipeline.model_dir),
    }
    if args.json:
        print(json.dumps(report))
    else:
        log(f"[{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tokens/s, "
            f"{result.bytes_up} bytes up, {result.bytes_down} bytes down]")
    return 0


def _eos_ids(tokenizer, config) -> list[int]:
    ids = config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
