"""Unsplit baseline through the same decoding loop: the edge runs every layer, nothing crosses a link.

Its tokens are the reference the split scripts must reproduce with `--codec none`.
"""
import sys

from src.cli import run

first_split_layer_indices = None  # L: all layers on the edge
second_split_layer_indices = None

if __name__ == "__main__":
    sys.exit(run("one", first_split_layer_indices, second_split_layer_indices))
