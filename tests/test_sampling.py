"""Sampling at the edge (or, in the two-part split, in the cloud) equals HF generate(do_sample=True) token for token."""
import re

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


# generation_config.json entries besides the five options, as a model's file may set them, each with the index of the
# greedy token that serves as end-of-sequence id (so that the entries which read that id change the tokens); "FIRST"
# stands for the token greedy decoding gives first. The tiny model's greedy tokens: [90, 52, 90, 52, 29, ...].
MODEL_ENTRIES = [
    (dict(no_repeat_ngram_size=2), -1),
    (dict(suppress_tokens="FIRST"), -1),
    (dict(bad_words_ids="FIRST"), -1),
    (dict(min_new_tokens=10), 4),
    (dict(min_length=20), 4),
    (dict(min_length=20, min_new_tokens=0), 4),  # generate: min_new_tokens, even 0, replaces min_length (no change)
    (dict(forced_eos_token_id=7), -1),
    (dict(exponential_decay_length_penalty=(2, 3.0)), -1),
    (dict(sequence_bias=[[[7], 9.0]]), -1),
    (dict(encoder_repetition_penalty=3.0), -1),  # a decoder-only model's "encoder" input is its prompt
    (dict(typical_p=0.5, do_sample=True), -1),  # sampled, with the seed below
]


@pytest.mark.parametrize("index", range(len(MODEL_ENTRIES)))
def test_the_model_files_other_entries_decide_as_in_generate(tiny_tied, tmp_path, index):
    """The split applies generation_config.json's n-gram, suppression, bad-word, length and bias entries as
    `generate` does (it ignored them: no_repeat_ngram_size=2 gave [90, 52, 90, 52, ...] where generate gave
    [90, 52, 90, 73, ...]); the two-part split, whose cloud never sees the ids, refuses them by name."""
    import shutil

    import torch
    from transformers import GenerationConfig

    folder, model = tiny_tied
    free, _ = hf_greedy(model, PROMPT, NEW)
    spec, eos_index = MODEL_ENTRIES[index]
    eos = [free[eos_index]]
    assert free.index(eos[0]) == eos_index % NEW  # its first occurrence
    first = [free[0]] if "suppress_tokens" in spec else [[free[0]]]
    entries = {name: first if value == "FIRST" else value for name, value in spec.items() if name != "do_sample"}
    sample = spec.get("do_sample", False)

    def generate(**options) -> list[int]:
        ids = torch.tensor([PROMPT])
        torch.manual_seed(5)
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=sample,
                              eos_token_id=eos, pad_token_id=0, **options)[0, len(PROMPT):].tolist()

    reference, plain = generate(**entries), generate()
    assert (reference != plain) == ("min_new_tokens" not in entries or entries["min_new_tokens"] > 0), entries
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    GenerationConfig(**entries, do_sample=sample).save_pretrained(copy)  # transformers saves typical_p only with it
    config = SamplingConfig(do_sample=sample, seed=5).resolved(model_generation_defaults(copy))
    assert config.resolved() == config  # resolving again without the file keeps its entries
    applied = [] if entries.get("min_new_tokens") == 0 else list(entries)  # that pair changes nothing: none applied
    assert [name for name, _ in config.model_entries] == applied
    for first, second in [({1}, {3}), ({0, 1}, {2, 3, 4})]:
        pipeline = build_pipeline(str(copy), first, second, "none", seed=3, with_tokenizer=False)
        assert pipeline.edge.generate(PROMPT, NEW, eos, sampling=config).token_ids == reference, (entries, first, second)
    two_part = build_pipeline(str(copy), {1}, {4}, "none", two_part=True, with_tokenizer=False)
    if not applied:  # and the two-part split, which cannot apply entries, runs it
        assert two_part.edge.generate(PROMPT, NEW, eos, sampling=config).token_ids == reference
        return
    with pytest.raises(TriadicError, match=re.escape(f"sets {', '.join(entries)}, which the two-part split cannot apply")):
        two_part.edge.generate(PROMPT, NEW, eos, sampling=config)


@pytest.mark.parametrize(
    "entry,expected",
    [
        (dict(guidance_scale=1.5), "sets guidance_scale, which generate applies and the split does not"),
        (dict(num_beams=3), "makes generate use beam_search"),
        (dict(penalty_alpha=0.6), "makes generate use contrastive_search"),  # with generate's default top_k filled in
        (dict(repetition_penalty=2), "`penalty` has to be a strictly positive float"),  # generate refuses an integer
        (dict(max_time=5.0), "sets max_time, which generate applies and the split does not"),
        (dict(token_healing=True), "sets token_healing, which generate applies and the split does not"),
        (dict(max_new_tokens=0), "generation_config.json: `max_new_tokens` must be greater than 0"),  # the split ignored it whole
        (dict(num_return_sequences=3, do_sample=True), "sets num_return_sequences 3: generate returns that many answers"),
        (dict(bad_words_ids=[[-1]]), ": Each list in `bad_words_ids` has to be a list of positive integers"),  # transformers'
        (dict(typical_p=0), "`typical_p` has to be a float > 0 and < 1"),  # checked for sampling, also when greedy
        (dict(min_new_tokens="x"), "min_new_tokens must be an integer, not 'x'"),  # the kinds: transformers raised inside
        (dict(no_repeat_ngram_size=True), "no_repeat_ngram_size must be an integer, not True"),
        (dict(exponential_decay_length_penalty=[1, "x"]), "exponential_decay_length_penalty must be a pair"),
        (dict(suppress_tokens=[None]), "suppress_tokens must be a list of token ids, not [None]"),
        (dict(forced_bos_token_id="5"), "forced_bos_token_id must be a token id, not '5'"),
        (dict(repetition_penalty="hot"), "repetition_penalty must be a finite number, not 'hot'"),  # greedy reads it
        (dict(bad_words_ids=[[5, 99999]]), "bad_words_ids holds token id 99999, outside the model's vocabulary of 97"),
        (dict(forced_eos_token_id=97), "forced_eos_token_id holds token id 97"),  # transformers: an IndexError at the last step
        (dict(sequence_bias=[[[3, 500], 1.0]]), "sequence_bias holds token id 500"),
        (dict(cache_implementation="static"), "sets cache_implementation 'static': generate then attends over another cache"),
        (dict(cache_implementation="quantized"), "sets cache_implementation 'quantized'"),
    ],
)
def test_an_entry_the_split_cannot_apply_is_refused_in_one_line(tiny_tied, tmp_path, entry, expected):
    import json
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_tied[0], copy)
    path = copy / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **entry}))  # as a hand-edited file says it
    with pytest.raises(TriadicError) as caught:
        config = SamplingConfig().resolved(model_generation_defaults(copy))
        build_pipeline(str(copy), {1}, {3}, "none", with_tokenizer=False).edge.generate(PROMPT, 4, [2], sampling=config)
    assert "generation_config.json" in str(caught.value) and expected in str(caught.value) and "\n" not in str(caught.value)


def test_the_files_values_are_read_as_generate_reads_them(tiny_tied, tmp_path):
    """Greedy decoding ignores the file's sampling options (a file saying temperature 0 refused every greedy run);
    a sampled request refuses it naming the file, not a flag; without generation_config.json, config.json's
    generation entries apply, as from_pretrained gives them to generate; entries at their no-op value do not make
    the two-part split refuse the file."""
    import json
    import shutil

    import torch

    folder, model = tiny_tied
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / "generation_config.json").write_text('{"temperature": 0.0, "renormalize_logits": false, "suppress_tokens": [], '
                                                 '"min_new_tokens": 0, "min_length": 30, "eos_token_id": 2, "cache_implementation": "hybrid"}')
    greedy = SamplingConfig().resolved(model_generation_defaults(copy))
    assert greedy.model_entries == () and greedy.temperature == 1.0
    assert SamplingConfig(temperature=0.0).resolved(model_generation_defaults(copy)).temperature == 0.0  # a greedy flag
    two_part = build_pipeline(str(copy), {1}, {4}, "none", two_part=True, with_tokenizer=False)
    assert two_part.edge.generate(PROMPT, NEW, sampling=greedy).token_ids == hf_greedy(model, PROMPT, NEW)[0]
    with pytest.raises(TriadicError, match=re.escape("the model's generation_config.json sets temperature 0.0: must be at least")):
        SamplingConfig(do_sample=True).resolved(model_generation_defaults(copy))

    (copy / "generation_config.json").unlink()
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "no_repeat_ngram_size": 2}))
    ids = torch.tensor([PROMPT])
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                               pad_token_id=0, no_repeat_ngram_size=2)[0, len(PROMPT):].tolist()
    resolved = SamplingConfig().resolved(model_generation_defaults(copy))
    assert resolved.model_entries == (("no_repeat_ngram_size", 2),)
    assert build_pipeline(str(copy), {1}, {3}, "none", with_tokenizer=False).edge.generate(PROMPT, NEW, sampling=resolved).token_ids == reference


def test_an_entry_that_fails_at_a_step_ends_the_request_in_one_line(tiny_tied, tmp_path):
    """An infinite sequence bias passes every check, then makes sampling's probabilities NaN (generate fails there too):
    one line, and the edge's session is left for a fresh start, not half-way."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_tied[0], copy)
    (copy / "generation_config.json").write_text('{"sequence_bias": [[[5], Infinity]]}')
    config = SamplingConfig(do_sample=True).resolved(model_generation_defaults(copy))
    edge = build_pipeline(str(copy), {1}, {3}, "none", with_tokenizer=False).edge
    with pytest.raises(TriadicError, match="choosing the token failed with these options and the model's generation_config.json"):
        edge.generate(PROMPT, 4, [2], sampling=config)
    assert edge.generate(PROMPT, 4, [2]).token_ids == hf_greedy(tiny_tied[1], PROMPT, 4)[0]  # greedy: the bias is a warper's input
    (copy / "generation_config.json").write_text('{"exponential_decay_length_penalty": [2, 1.5]}')
    decay = SamplingConfig().resolved(model_generation_defaults(copy))
    with pytest.raises(TriadicError, match="generation_config.json with this request"):  # the decay needs an eos id
        edge.generate(PROMPT, 4, sampling=decay)


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
