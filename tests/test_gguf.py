"""--base-model FILE.gguf: any GGUF file that transformers' loader reads is converted once and split like a folder."""
from __future__ import annotations

import json

from src.checkpoint import EMBEDDED_MODELS, cache_dir, resolve_model_dir
from src.pipeline import build_pipeline


def test_a_gguf_path_is_converted_once_and_splits_like_the_embedded_model(embedded, japan_ids):
    gguf = EMBEDDED_MODELS["smollm2-135m"].gguf_path()
    folder = resolve_model_dir(str(gguf))
    assert folder.parent == cache_dir() / "gguf" and folder.name.startswith(gguf.stem)
    assert resolve_model_dir(str(gguf)) == folder  # cached: the second call converts nothing
    embedded_folder, _, _ = embedded
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 30
    from_gguf = build_pipeline(str(gguf), {4}, {26}, with_tokenizer=False).edge.generate(japan_ids, 12).token_ids
    from_folder = build_pipeline(str(embedded_folder), {4}, {26}, with_tokenizer=False).edge.generate(japan_ids, 12).token_ids
    assert from_gguf == from_folder
