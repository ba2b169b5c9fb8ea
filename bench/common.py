"""Helpers shared by the benchmarks: machine description and set parsing."""
from __future__ import annotations

import argparse
import os
import platform


def machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads"


def parse_list(text: str) -> set[int]:
    """'1,2,3' or a range '1-6'."""
    values: set[int] = set()
    for item in text.split(","):
        if "-" in item.strip()[1:]:
            lo, hi = item.split("-")
            values.update(range(int(lo), int(hi) + 1))
        else:
            values.add(int(item))
    return values


def parse_sets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[set[int], set[int]]:
    """`--first` and `--second` as layer sets; a bad one ends as a bad flag does (argparse's usage and error line, exit 2)."""
    try:
        return parse_list(args.first), parse_list(args.second)
    except ValueError:
        parser.error(f"--first {args.first!r} --second {args.second!r}: expected layer indices and ranges, such as 1,2,3 or 1-6")
