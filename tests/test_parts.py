"""Each part holds only its own weights; LoRA adapters apply to each part's own layers."""
import pytest
import torch
from torch import nn

from src.checkpoint import is_column_major, load_config
from src.models import FirstLlamaForCausalLM, SecondLlamaForCausalLM, ThirdLlamaForCausalLM
from src.pipeline import build_pipeline
from tiny import hf_greedy

PROMPT = [1, 5, 9, 33, 17, 80, 3, 41]


def layer_params(model, index):
    return sum(p.numel() for p in model.model.layers[index].parameters())


@pytest.mark.parametrize("checkpoint", ["tiny_tied", "tiny_untied"])
@pytest.mark.parametrize("a,b", [(0, 0), (1, 3), (2, 2), (0, 4), (4, 4)])
def test_parts_hold_only_their_own_parameters(checkpoint, a, b, request):
    folder, full = request.getfixturevalue(checkpoint)
    config = load_config(folder)
    L = config.num_hidden_layers
    first = FirstLlamaForCausalLM.from_checkpoint(folder, config, range(0, a))
    second = SecondLlamaForCausalLM.from_checkpoint(folder, config, range(a, b))
    tied = {"lm_head.weight": first.model.embed_tokens.weight} if config.tie_word_embeddings else None
    third = ThirdLlamaForCausalLM.from_checkpoint(folder, config, range(b, L), shared=tied)

    vocab, hidden = config.vocab_size, config.hidden_size
    per_layer = layer_params(full, 0)
    assert first.parameter_count() == vocab * hidden + a * per_layer
    assert second.parameter_count() == (b - a) * per_layer
    third_own = third.parameter_count(exclude=[first.model.embed_tokens.weight])
    assert third_own == (L - b) * per_layer + hidden + (0 if config.tie_word_embeddings else vocab * hidden)
    full_count = sum(p.numel() for p in full.parameters())  # tied weights counted once
    assert first.parameter_count() + second.parameter_count() + third_own == full_count

    assert second.model.embed_tokens is None and second.model.norm is None and not hasattr(second, "lm_head")
    for index in range(L):
        assert isinstance(second.model.layers[index], nn.Identity) == (index not in range(a, b))
        assert isinstance(first.model.layers[index], nn.Identity) == (index >= a)
    assert all(p.device.type == "cpu" for part in (first, second, third) for p in part.parameters())
    if config.tie_word_embeddings:  # the edge holds the tied matrix once
        assert third.lm_head.weight is first.model.embed_tokens.weight


def test_cloud_of_the_default_sets_has_no_embeddings_or_head(tiny_tied):
    folder, _ = tiny_tied
    pipeline = build_pipeline(str(folder), {0, 1}, {2, 3}, with_tokenizer=False)
    names = [name for name, _ in pipeline.cloud.part.named_parameters()]
    assert names and all(name.startswith(("model.layers.0.", "model.layers.1.", "model.layers.2.")) for name in names)


def test_parts_built_in_several_threads_at_once_each_hold_their_weights(tiny_tied):
    """A build patches process-wide state for a moment (accelerate's meta-device registration, the default
    dtype): builds in other threads take turns with it rather than losing their parameters to it."""
    import threading

    folder, _ = tiny_tied
    errors, tokens = [], []

    def build() -> None:
        for _ in range(3):
            try:
                tokens.append(build_pipeline(str(folder), {1}, {3}, with_tokenizer=False).edge.generate(PROMPT, 3).token_ids)
            except Exception as error:  # noqa: BLE001 (collected: the assertion below says which)
                errors.append(repr(error))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(tokens) == 12 and all(t == tokens[0] for t in tokens)


def test_lossy_sides_store_their_layers_weights_column_major_and_lossless_sides_as_transformers(tiny_tied, monkeypatch):
    """A lossy codec's sides transpose their fp32 layer weights in memory (faster over several rows); values,
    shapes and the tied head stay; a lossless run keeps transformers' layout, to compute what HF computes.
    Here where the panel kernel cannot run; where it can, a lossy side's layers are panels (test_panels.py)."""
    from src import panels

    monkeypatch.setattr(panels, "why_no_kernel", lambda: "no kernel in this test")
    folder, model = tiny_tied
    for codec, column_major in [("int8", True), ("none", False)]:
        pipeline = build_pipeline(str(folder), {1, 2}, {2, 3}, codec, with_tokenizer=False)
        edge = pipeline.edge
        for part in (edge.first, edge.third, pipeline.cloud.part):
            linears = [m for m in part.model.layers.modules() if isinstance(m, nn.Linear)]
            assert linears and all(is_column_major(m.weight) == column_major for m in linears), codec
            for name, param in part.named_parameters():
                assert torch.equal(param, model.get_parameter(part.checkpoint_name(name))), name
        assert edge.third.lm_head.weight is edge.first.model.embed_tokens.weight
        assert edge.third.lm_head.weight.is_contiguous()


def make_adapter(folder, model, path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)  # PEFT initialises B to zero: make the adapter matter
    peft_model.save_pretrained(path)
    return peft_model.merge_and_unload()


def test_lora_adapter_gives_the_same_tokens_split_and_unsplit(tmp_path):
    from tiny import make_tiny_checkpoint

    folder, base = make_tiny_checkpoint(tmp_path / "base", seed=3, num_layers=4)
    plain, _ = hf_greedy(base, PROMPT, 16)
    merged = make_adapter(folder, base, tmp_path / "adapter")
    reference, reference_logits = hf_greedy(merged, PROMPT, 16)
    assert reference != plain  # the adapter changes the output
    for first, second in [({1}, {3}), ({0, 1, 2}, {2, 3, 4}), ({4}, {4})]:
        pipeline = build_pipeline(str(folder), first, second, seed=1, lora_weights=str(tmp_path / "adapter"), with_tokenizer=False)
        result = pipeline.edge.generate(PROMPT, 16, keep_logits=True)
        assert result.token_ids == reference, (first, second)
        assert max((x - y).abs().max().item() for x, y in zip(result.logits, reference_logits)) < 1e-4


def test_load_in_8bit_quantizes_each_sides_own_layers(tiny_tied):
    """LLM.int8() weights through bitsandbytes: int8 storage, logits close to full precision."""
    from src.pipeline import SideOptions

    folder, model = tiny_tied
    _, reference_logits = hf_greedy(model, PROMPT, 4)
    side = SideOptions(load_in_8bit=True)
    pipeline = build_pipeline(str(folder), {1}, {3}, edge_side=side, cloud_side=side, with_tokenizer=False)
    cloud_weights = [p for name, p in pipeline.cloud.part.named_parameters() if name.endswith("q_proj.weight")]
    assert cloud_weights and all(w.dtype == torch.int8 for w in cloud_weights)
    assert pipeline.edge.first.model.embed_tokens.weight.dtype == torch.float32
    result = pipeline.edge.generate(PROMPT, 4, keep_logits=True)
    scale = max(x.abs().max().item() for x in reference_logits)
    gap = max((x - y).abs().max().item() for x, y in zip(result.logits, reference_logits))
    assert 0 < gap < 0.1 * scale


def test_each_side_holds_its_weights_once_in_the_layout_a_lossy_run_uses(embedded):
    """A lossy side's layer weights are read straight into their column-major layout: re-laying out weights read
    through the file's mapping would leave the mapped pages resident too (1.66x the edge's parameters, 2.05x
    the cloud's, when tried). Peak RSS of each side built alone in a fresh process, every page touched."""
    from bench.memory import memory_probe

    for role in ("edge", "cloud"):
        probe = memory_probe(role)
        assert (probe["peak"] - probe["base"]) / probe["param_bytes"] < 1.25, role


def test_weights_read_on_the_cpu_hold_the_checkpoints_values_in_aligned_storage_whatever_their_stored_type(tmp_path):
    """Read by blocks of rows (fp32, bf16, a weight wider than the read buffer, row- or column-major, any rank,
    empty), or through the mapping (a type the block reader leaves out): the checkpoint's values, `W.T`
    contiguous where asked, and every float tensor 64-byte aligned. The file puts its tensors at 8-byte
    offsets, and MKL's products over such a weight rounded differently from the same product over an
    aligned copy (logits 1e-5 from HF `generate` for four families on an AMD EPYC)."""
    from safetensors.torch import save_file

    from src.checkpoint import read_tensors

    stored = {"a": torch.randn(5, 7), "b": torch.randn(3, 4).to(torch.bfloat16), "c": torch.randn(3, 300_000),
              "d": torch.randint(-100, 100, (4, 6), dtype=torch.int8), "e": torch.randn(9), "f": torch.randn(3, 2, 5),
              "g": torch.zeros(4, 0), "h": torch.randn(6, 5)}
    save_file(stored, tmp_path / "model.safetensors")
    names = {name: name for name in stored}
    tensors = read_tensors(tmp_path, names, torch.float32, "cpu", column_major=frozenset("abcd"))
    for name, value in stored.items():
        assert torch.equal(tensors[name], value.float()), name
        expected = (1, value.shape[0]) if name in "abcd" else torch.empty(value.shape).stride()
        assert tensors[name].stride() == expected, name
        assert tensors[name].numel() == 0 or tensors[name].data_ptr() % 64 == 0, name


def test_a_built_side_holds_its_own_weights_so_its_model_file_may_change_under_it(tiny_untied, tmp_path):
    """No weight stays in the file's mapping, not even an untied embedding (only ever indexed): a long-lived edge
    whose model file is rewritten in place or truncated (a `save_pretrained` into the same folder) went on with
    garbage rows or died of SIGBUS when a mapped embedding was tried. It keeps computing what it computed."""
    import shutil

    from src.pipeline import build_pipeline

    folder, _ = tiny_untied
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    pipeline = build_pipeline(str(copy), {1}, {3}, "none", with_tokenizer=False)
    before = pipeline.edge.generate(PROMPT, 4, keep_logits=True)
    weights = copy / "model.safetensors"
    weights.write_bytes(bytes(weights.stat().st_size))  # rewritten in place: zeros
    rewritten = pipeline.edge.generate(PROMPT, 4, keep_logits=True)
    weights.write_bytes(b"")  # truncated
    truncated = pipeline.edge.generate(PROMPT, 4, keep_logits=True)
    for after in (rewritten, truncated):
        assert after.token_ids == before.token_ids
        assert all(torch.equal(x, y) for x, y in zip(after.logits, before.logits))


def test_a_cloud_with_the_head_must_run_to_the_last_layer(tiny_tied):
    """The two-part cloud returns tokens, so it runs to layer L; its error names L."""
    from src.cloud import Cloud
    from src.schedule import SplitSchedule

    folder, _ = tiny_tied
    config = load_config(folder)
    part = ThirdLlamaForCausalLM.from_checkpoint(folder, config, range(2, 4))
    with pytest.raises(ValueError, match=r"second must be \{4\}"):
        Cloud(SplitSchedule((2,), (3,), 4), part)
