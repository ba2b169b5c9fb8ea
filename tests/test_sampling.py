"""Sampling at the edge (or, in the two-part split, in the cloud) equals HF generate(do_sample=True) token for token."""
import pytest

from src.pipeline import build_pipeline
from src.sampling import SamplingConfig, Sampler, model_generation_defaults
from src.utils import TriadicError
from tiny import hf_greedy, hf_sample

PROMPT = [1, 5, 9, 33, 17, 80, 3, 41]
NEW = 24
# Four settings of the processors and warpers; top_k unset means transformers' default (50).
SETTINGS = [
    dict(temperature=1.0, top_k=0),
    dict(temperature=0.7, top_k=20, top_p=0.9),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=0.9, top_p=0.8, repetition_penalty=1.3),
]
SPLITS = [({1}, {3}), ({0}, {4}), ({0, 1}, {2, 3, 4})]  # two fixed splits and moving cuts


def sampling(folder, seed, **options) -> SamplingConfig:
    return SamplingConfig(do_sample=True, seed=seed, **options).resolved(model_generation_defaults(folder))


@pytest.mark.parametrize("index", range(len(SETTINGS)))
def test_sampled_tokens_equal_generate(tiny_untied, index):
    folder, model = tiny_untied
    options, seed = SETTINGS[index], 100 + index
    reference = hf_sample(model, PROMPT, NEW, seed, **options)
    greedy, _ = hf_greedy(model, PROMPT, NEW)
    assert reference != greedy  # the setting really samples
    for first, second in SPLITS:
        pipeline = build_pipeline(str(folder), first, second, "none", seed=3, with_tokenizer=False)
        result = pipeline.edge.generate(PROMPT, NEW, sampling=sampling(folder, seed, **options))
        assert result.token_ids == reference, (first, second, options)


def test_greedy_with_repetition_penalty_equals_generate(tiny_tied):
    folder, model = tiny_tied
    import torch

    ids = torch.tensor([PROMPT])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                         repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)
    reference = out[0, len(PROMPT):].tolist()
    assert reference != hf_greedy(model, PROMPT, NEW)[0]
    config = SamplingConfig(repetition_penalty=1.5).resolved(model_generation_defaults(folder))
    result = build_pipeline(str(folder), {1}, {3}, with_tokenizer=False).edge.generate(PROMPT, NEW, sampling=config)
    assert result.token_ids == reference


def test_two_part_split_samples_in_the_cloud(tiny_tied):
    folder, model = tiny_tied
    options, seed = SETTINGS[1], 7
    reference = hf_sample(model, PROMPT, NEW, seed, **options)
    pipeline = build_pipeline(str(folder), {1, 2}, {4}, "none", two_part=True, with_tokenizer=False)
    assert pipeline.edge.third is None  # the token comes from the cloud
    assert pipeline.edge.generate(PROMPT, NEW, sampling=sampling(folder, seed, **options)).token_ids == reference
    with pytest.raises(TriadicError, match="never sees the prompt"):
        pipeline.edge.generate(PROMPT, NEW, sampling=sampling(folder, seed, repetition_penalty=1.2))


def test_sampling_seed_is_not_the_schedule_seed(tiny_tied):
    folder, _ = tiny_tied
    runs = {}
    for schedule_seed, sampling_seed in [(0, 0), (5, 0), (0, 1)]:
        pipeline = build_pipeline(str(folder), {0, 1}, {2, 3}, "none", seed=schedule_seed, with_tokenizer=False)
        runs[schedule_seed, sampling_seed] = pipeline.edge.generate(PROMPT, NEW, sampling=sampling(folder, sampling_seed)).token_ids
    assert runs[0, 0] == runs[5, 0]  # lossless: the cuts do not change the tokens
    assert runs[0, 0] != runs[0, 1]


@pytest.mark.parametrize(
    "options,expected",
    [
        (dict(do_sample=True, temperature=0.0), "--temperature 0.0: must be at least 1e-05 when sampling"),
        (dict(do_sample=True, temperature=1e-300), "--temperature 1e-300: must be at least 1e-05"),
        (dict(do_sample=True, temperature=-1.0), "--temperature -1.0"),
        (dict(top_p=0.0), "--top-p 0.0: must be in (0, 1]"),
        (dict(top_p=1.01), "--top-p 1.01"),
        (dict(top_k=-3), "--top-k -3: must be an integer in [0, 2**32)"),
        (dict(top_k=2**32), "--top-k 4294967296: must be an integer in [0, 2**32)"),
        (dict(min_p=1.5), "--min-p 1.5: must be in [0, 1]"),
        (dict(repetition_penalty=0.0), "--repetition-penalty 0.0: must be in [0.01, 100]"),
        (dict(repetition_penalty=1e-40), "--repetition-penalty 1e-40: must be in"),  # subnormal in float32: inf logits
        (dict(repetition_penalty=1e300), "--repetition-penalty 1e+300: must be in"),  # inf in float32: 0 * inf is NaN
        (dict(seed=-1), "--sampling-seed -1"),
    ],
)
def test_out_of_range_options_are_refused(options, expected):
    with pytest.raises(TriadicError) as caught:
        SamplingConfig(**options)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


def test_greedy_ignores_temperature_zero():
    assert SamplingConfig(temperature=0.0).resolved().do_sample is False
    assert Sampler(SamplingConfig(temperature=0.0).resolved()).is_plain_greedy
