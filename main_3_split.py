"""Triadic split: Edge (embeddings, first layers) -> Cloud (middle layers) -> Edge (last layers, norm, head).

Edit the two sets below: at every generated token the first cut is drawn from the first set and the
second cut from the second set (max(first) <= min(second)). One element each gives a fixed split.
`--first` / `--second` on the command line override them.
"""
import sys

from src.cli import run

first_split_layer_indices = {1, 2, 3, 4, 5, 6}
second_split_layer_indices = {24, 25, 26, 27, 28, 29}

if __name__ == "__main__":
    sys.exit(run("three", first_split_layer_indices, second_split_layer_indices))
