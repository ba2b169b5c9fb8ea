"""Two-part split: Edge (embeddings, layers [0, a)) -> Cloud (layers [a, L), norm, head, next token).

The classic split-computing setup, for comparison with the triadic one: here the cloud sees the
generated tokens. `--first` overrides the set below; the second cut is always L.
"""
import sys

from src.cli import run

first_split_layer_indices = {15}
second_split_layer_indices = None  # the cloud runs to the last layer

if __name__ == "__main__":
    sys.exit(run("two", first_split_layer_indices, second_split_layer_indices))
