"""Lossless transport reproduces unsplit HF generate(do_sample=False), for every fixed split of tiny models."""
import pytest
import torch
from transformers import LlamaForCausalLM

from src.pipeline import SideOptions, build_pipeline
from tiny import hf_greedy

PROMPT = [1, 5, 9, 33, 17, 80, 3, 41]
NEW = 16


def max_logit_gap(logits, reference):
    assert len(logits) == len(reference)
    return max((x - y).abs().max().item() for x, y in zip(logits, reference))


@pytest.mark.parametrize("checkpoint", ["tiny_tied", "tiny_untied"])
def test_every_fixed_three_part_split_matches_generate(checkpoint, request):
    folder, model = request.getfixturevalue(checkpoint)
    reference, reference_logits = hf_greedy(model, PROMPT, NEW)
    assert len(set(reference)) > 3  # the reference is not degenerate
    L = model.config.num_hidden_layers
    for a in range(L + 1):
        for b in range(a, L + 1):
            pipeline = build_pipeline(str(folder), {a}, {b}, with_tokenizer=False)
            result = pipeline.edge.generate(PROMPT, NEW, keep_logits=True)
            assert result.token_ids == reference, (a, b)
            assert max_logit_gap(result.logits, reference_logits) < 1e-5, (a, b)
            assert result.splits == [(a, b)] * NEW
            if a < b:  # prefill carries the whole prompt, then one position per step each way
                assert result.positions_up == len(PROMPT) + NEW - 1
                down_prefill = 1 if b == L else len(PROMPT)
                assert result.positions_down == down_prefill + NEW - 1
            else:
                assert pipeline.cloud is None and result.bytes_up == 0


@pytest.mark.parametrize("checkpoint", ["tiny_tied", "tiny_untied"])
def test_two_part_split_matches_generate(checkpoint, request):
    folder, model = request.getfixturevalue(checkpoint)
    reference, _ = hf_greedy(model, PROMPT, NEW)
    L = model.config.num_hidden_layers
    for a in range(L + 1):
        pipeline = build_pipeline(str(folder), {a}, {L}, two_part=True, with_tokenizer=False)
        result = pipeline.edge.generate(PROMPT, NEW)
        assert result.token_ids == reference, a
        if a < L:  # tokens come back from the cloud: 4-byte payload after the header
            assert result.bytes_down == NEW * (24 + 4)
            assert pipeline.edge.third is None


def test_generation_stops_after_eos(tiny_tied):
    folder, model = tiny_tied
    reference, _ = hf_greedy(model, PROMPT, NEW)
    eos = reference[5]
    first_eos = reference.index(eos)
    pipeline = build_pipeline(str(folder), {1}, {3}, with_tokenizer=False)
    result = pipeline.edge.generate(PROMPT, NEW, eos_token_ids=[eos])
    assert result.token_ids == reference[: first_eos + 1]


def test_cloud_and_edge_dtypes_may_differ(tiny_tied):
    """Edge in float32, cloud in bfloat16: the states are cast on receipt and decoding still runs."""
    from src.pipeline import SideOptions

    folder, model = tiny_tied
    reference, reference_logits = hf_greedy(model, PROMPT, NEW)
    pipeline = build_pipeline(str(folder), {1}, {3}, cloud_side=SideOptions(dtype=torch.bfloat16), with_tokenizer=False)
    assert next(pipeline.cloud.part.parameters()).dtype == torch.bfloat16
    result = pipeline.edge.generate(PROMPT, 4, keep_logits=True)
    assert 0 < max_logit_gap(result.logits, reference_logits[:4]) < 0.5


@pytest.mark.parametrize("checkpoint", ["tiny_tied", "tiny_untied"])
def test_bf16_splits_match_generate_in_bf16(checkpoint, request):
    """bf16 on both sides of the comparison: every fixed split and moving cuts give HF's bf16 logits bit for bit.

    Moving cuts catch lagging layers up step by step over a lossless link in bf16, as HF ran those
    positions (one chunk would change the order of additions, which bf16 shows).
    """
    folder, _ = request.getfixturevalue(checkpoint)
    # from_pretrained, not .to(bfloat16): the latter would also round the rotary inv_freq buffer to bf16.
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    reference, reference_logits = hf_greedy(model, PROMPT, NEW)
    assert len(set(reference)) > 3
    side = SideOptions(dtype=torch.bfloat16)
    L = model.config.num_hidden_layers
    for a, b in [(a, b) for a in range(L + 1) for b in range(a, L + 1)]:
        pipeline = build_pipeline(str(folder), {a}, {b}, edge_side=side, cloud_side=side, with_tokenizer=False)
        result = pipeline.edge.generate(PROMPT, NEW, keep_logits=True)
        assert result.logits[0].dtype == torch.bfloat16
        assert result.token_ids == reference, (a, b)
        assert max_logit_gap(result.logits, reference_logits) == 0, (a, b)
    for seed in (0, 1):
        pipeline = build_pipeline(str(folder), {0, 1, 2}, {2, 3, 4}, seed=seed, edge_side=side, cloud_side=side, with_tokenizer=False)
        result = pipeline.edge.generate(PROMPT, NEW, keep_logits=True)
        assert result.token_ids == reference, seed
        # Lagging layers catch up step by step over a lossless link in bf16 (Party.use_step_catch_up): bit for bit.
        assert max_logit_gap([x.float() for x in result.logits], [y.float() for y in reference_logits]) == 0, seed
        assert pipeline.edge.catch_up_by_step and pipeline.cloud.catch_up_by_step


def test_step_catch_up_cuts_where_hf_steps_cut_across_turns(tiny_tied):
    """Both sides record each request's prefill; a lagging layer's gap is cut at them, then one position per step."""
    folder, _ = tiny_tied
    side = SideOptions(dtype=torch.bfloat16)
    pipeline = build_pipeline(str(folder), {0, 1, 2}, {2, 3, 4}, edge_side=side, cloud_side=side, with_tokenizer=False)
    edge, cloud = pipeline.edge, pipeline.cloud
    assert edge.catch_up_by_step  # lossless link, bf16; the cloud decides from each message's codec
    with edge.session() as chat:
        first = chat.generate(PROMPT, 4)
        assert cloud.catch_up_by_step
        assert edge.prefills == cloud.prefills == [(0, len(PROMPT))]
        history = PROMPT + first.token_ids[:2]  # 10 of the 11 cached positions, then 3 new ones
        chat.generate(history + [7, 8, 9], 2)
        assert edge.prefills == cloud.prefills == [(0, 8), (10, 13)]
        assert edge.segments(5, 14) == [(5, 8), (8, 9), (9, 10), (10, 13), (13, 14)]
        assert edge.segments(13, 14) == [(13, 14)]
    fp32 = build_pipeline(str(folder), {0, 1, 2}, {2, 3, 4}, with_tokenizer=False)
    assert not fp32.edge.catch_up_by_step and fp32.edge.segments(5, 14) == [(5, 14)]
    lossy = build_pipeline(str(folder), {0, 1, 2}, {2, 3, 4}, "int8", edge_side=side, cloud_side=side, with_tokenizer=False)
    assert not lossy.edge.catch_up_by_step
