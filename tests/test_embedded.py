"""On the embedded SmolLM2-135M-Instruct: split decoding gives exactly the tokens of unsplit HF generate."""
import pytest
import torch

from src.pipeline import build_pipeline

NEW = 40
L = 30


@pytest.fixture(scope="module")
def reference(embedded, japan_ids):
    _, model, _ = embedded
    ids = torch.tensor([japan_ids])
    # An explicit all-ones mask: otherwise generate masks every prompt token equal to pad_token_id
    # (here <|im_end|>, id 2, which the chat template puts in the prompt).
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=2)
    tokens = out[0, len(japan_ids):].tolist()
    assert len(set(tokens)) > 15  # a real response, not a repetition
    return tokens


@pytest.mark.parametrize("a,b", [(0, 0), (0, L), (L, L), (1, L - 1), (L // 2, L // 2), (4, 26), (8, 22), (0, 1), (29, 30), (12, 20)])
def test_fixed_splits_match_generate(embedded, japan_ids, reference, a, b):
    pipeline = build_pipeline(str(embedded[0]), {a}, {b}, with_tokenizer=False)
    assert pipeline.edge.generate(japan_ids, NEW).token_ids == reference


@pytest.mark.parametrize("first,second", [(set(range(1, 7)), set(range(24, 30))), ({0, 2, 9}, {15, 21, 30}), (set(range(10, 16)), set(range(15, 21)))])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_splits_match_generate(embedded, japan_ids, reference, first, second, seed):
    pipeline = build_pipeline(str(embedded[0]), first, second, seed=seed, with_tokenizer=False)
    result = pipeline.edge.generate(japan_ids, NEW)
    assert result.token_ids == reference
    assert len(set(result.splits)) > 3  # the cuts really moved


@pytest.mark.parametrize("a", [1, 15, 29])
def test_two_part_split_matches_generate(embedded, japan_ids, reference, a):
    pipeline = build_pipeline(str(embedded[0]), {a}, {L}, two_part=True, with_tokenizer=False)
    assert pipeline.edge.generate(japan_ids, NEW).token_ids == reference


def test_main_scripts_match_generate(embedded, japan_ids, reference, capsys):
    """The three entry scripts, through their real command line, with --json."""
    import json

    from src.cli import run

    outputs = {}
    for mode, first, second in [("one", None, None), ("two", {15}, None), ("three", {1, 2, 3, 4, 5, 6}, {24, 25, 26, 27, 28, 29})]:
        # The reference is fp32: pin it (the default, auto, picks bf16 on a CPU with native bf16).
        assert run(mode, first, second, ["--json", "--max-new-tokens", str(NEW), "--codec", "none", "--dtype", "float32"]) == 0
        stdout = capsys.readouterr().out.strip().splitlines()
        assert len(stdout) == 1
        outputs[mode] = json.loads(stdout[0])
    for mode, report in outputs.items():
        assert report["prompt_token_ids"] == japan_ids
        assert report["token_ids"] == reference[: len(report["token_ids"])], mode
        assert "Japan" in report["text"]
    three = outputs["three"]
    assert len(three["splits"]) == len(three["token_ids"])
    assert three["bytes_up"] > 0 and three["bytes_down"] > 0 and three["positions_up"] >= len(japan_ids)
    assert set(three["layer_evals"]) == {"edge", "cloud"} and three["tokens_per_second"] > 0
    assert outputs["one"]["bytes_up"] == 0


@pytest.mark.parametrize("prompt", ["Describe a sunset over the sea.", "Plan a one-day trip to Paris."])
def test_chat_prompts_whose_greedy_start_is_a_near_tie(embedded, prompt):
    """These prompts' first tokens are close calls (0.06 and 0.6 logits apart); all splits still agree."""
    from src.utils import format_prompt

    folder, model, tokenizer = embedded
    ids = format_prompt(tokenizer, prompt, "chat")
    tensor = torch.tensor([ids])
    reference = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=2)
    reference = reference[0, len(ids):].tolist()
    for first, second in [({1}, {29}), ({0, 2, 9}, {15, 21, 30})]:
        assert build_pipeline(str(folder), first, second, with_tokenizer=False).edge.generate(ids, 16).token_ids == reference


@pytest.fixture(scope="module")
def reference_bf16(embedded, japan_ids):
    """HF generate with the model in bf16: the reference of the bf16 split, same dtype on both sides."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded[0], dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = torch.tensor([japan_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=2, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(japan_ids):].tolist(), [l[0].float() for l in out.logits]


def test_bf16_splits_match_generate_in_bf16(embedded, japan_ids, reference_bf16):
    """Splits in bf16 give HF's bf16 logits bit for bit, moving cuts too.

    In one chunk, a lagging layer's catch-up would change the order of additions, which bf16 shows
    (logits 0.56-0.77 apart, tokens diverging after 22-36 tokens on some prompts); over a lossless
    link in bf16 the layers catch up step by step instead (Party.use_step_catch_up).
    """
    from src.pipeline import SideOptions

    reference, reference_logits = reference_bf16
    side = SideOptions(dtype=torch.bfloat16)
    for first, second in [({1}, {L - 1}), ({L}, {L})]:
        pipeline = build_pipeline(str(embedded[0]), first, second, edge_side=side, cloud_side=side, with_tokenizer=False)
        result = pipeline.edge.generate(japan_ids, NEW, keep_logits=True)
        assert result.token_ids == reference, (first, second)
        assert max((x.float() - y).abs().max().item() for x, y in zip(result.logits, reference_logits)) == 0
    pipeline = build_pipeline(str(embedded[0]), set(range(1, 7)), set(range(24, 30)), edge_side=side, cloud_side=side, with_tokenizer=False)
    result = pipeline.edge.generate(japan_ids, NEW, keep_logits=True)
    assert result.token_ids == reference
    assert max((x.float() - y).abs().max().item() for x, y in zip(result.logits, reference_logits)) == 0


def test_default_dtype_is_auto(embedded, reference, reference_bf16, capsys):
    """Without --dtype the script computes in bf16 where the CPU has it natively, says so, and matches HF in that dtype."""
    import json

    from src.cli import run
    from src.precision import native_bf16

    assert run("three", {1}, {L - 1}, ["--json", "--max-new-tokens", "12", "--codec", "none"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip())
    expected = "bfloat16" if native_bf16("cpu") else "float32"
    assert report["dtype"] == {"edge": expected, "cloud": expected}
    assert f"dtype={expected} (auto: " in captured.err
    tokens = reference_bf16[0] if expected == "bfloat16" else reference
    assert report["token_ids"] == tokens[:12]
