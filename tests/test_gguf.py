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


def test_a_cache_that_cannot_be_written_is_one_line_before_any_conversion(tmp_path, monkeypatch):
    """$TRIADIC_CACHE at a file (or where no folder can be made): one line, at once, and nothing left behind; it was a
    traceback after the GGUF's two seconds of conversion."""
    import time

    import pytest

    from src.utils import TriadicError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for cache in (blocker, blocker / "below"):
        monkeypatch.setenv("TRIADIC_CACHE", str(cache))
        began = time.monotonic()
        with pytest.raises(TriadicError) as caught:
            resolve_model_dir(None)
        assert time.monotonic() - began < 1.0  # refused before transformers reads the GGUF file
        message = str(caught.value)
        assert message.startswith("cannot write the converted model under") and "TRIADIC_CACHE" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and blocker.read_text() == "not a folder"
