"""How the next token is chosen: transformers' own logits processors and warpers, and its sampling step.

`SamplingConfig` holds the decoding options a user sets (`--do-sample`, `--temperature`, ...).
`Sampler` turns one step's logits into a token exactly as `GenerationMixin._sample` does: float32
logits, the `LogitsProcessorList` that `GenerationMixin._get_logits_processor` builds for the same
`GenerationConfig`, then argmax (greedy) or softmax + `torch.multinomial`. transformers samples from
the global generator after `torch.manual_seed(seed)`; a private `torch.Generator` seeded the same way
draws the same numbers, so `Sampler(config)` with `seed=s` gives the tokens of
`torch.manual_seed(s); model.generate(do_sample=True, ...)` without touching the global state.
Each request (each turn of a session) starts from a freshly seeded generator, as a `generate` call would.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .utils import TriadicError, check_text, first_line, is_unsigned

if TYPE_CHECKING:
    from transformers import GenerationConfig, LogitsProcessorList

SEED_LIMIT = 1 << 64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1; the wire carries a u64 (and top-k a u32)
# The logits are divided by the temperature in float32: below this they may overflow to inf (and a
# temperature under 1.4e-45 is 0 there), and sampling fails. vLLM treats temperatures below 1e-5 as greedy.
MIN_TEMPERATURE = 1e-5
# The repetition penalty divides positive logits and multiplies negative ones, in float32: a penalty near 0 (1e-40 is
# subnormal there, 1e-45 is 0) or past float32's range gave inf or NaN logits, and sampling failed. CTRL used 1.2.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# The five options a request may set, as GenerationConfig names them.
OPTION_NAMES = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
# generation_config.json's other entries that decide which token `generate` picks, each with the kind of JSON value
# it must hold (checked here: transformers fails on a wrong one inside its processors, some only at the last step).
# A model's file sets them, a request cannot; the split applies them as `generate` does, through the processors
# `_get_logits_processor` builds. A decoder-only model's "encoder" input is its prompt.
MODEL_ENTRY_KINDS = {
    "no_repeat_ngram_size": "count", "encoder_no_repeat_ngram_size": "count", "min_length": "count",
    "min_new_tokens": "count", "encoder_repetition_penalty": "number", "typical_p": "number", "epsilon_cutoff": "number",
    "eta_cutoff": "number", "top_h": "number", "remove_invalid_values": "flag", "renormalize_logits": "flag",
    "forced_bos_token_id": "token id", "forced_eos_token_id": "token ids", "suppress_tokens": "token id list",
    "begin_suppress_tokens": "token id list", "bad_words_ids": "token id lists", "sequence_bias": "biases",
    "exponential_decay_length_penalty": "decay",
}
SAMPLING_ONLY_ENTRY_NAMES = ("typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")  # warpers: applied when sampling
# Entries `generate` applies that the split cannot: classifier-free guidance runs the whole model a second time, a
# watermark's processor is built from the model object, token healing rewrites the prompt, and stop strings and a
# time limit are stopping criteria of generate's own. A file that sets one is refused by name (and so is one that
# makes generate search beams, look up prompts or contrast: `GenerationConfig.get_generation_mode`).
UNSUPPORTED_ENTRY_NAMES = ("guidance_scale", "watermarking_config", "stop_strings", "token_healing", "max_time")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(_is_int(i) for i in value)


# What each kind of entry must hold: its description, and the check.
_KINDS = {
    "count": ("an integer", _is_int),
    "number": ("a finite number", _is_number),
    "flag": ("true or false", lambda v: isinstance(v, bool)),
    "token id": ("a token id", _is_int),
    "token ids": ("a token id or a list of token ids", lambda v: _is_int(v) or _is_ids(v)),
    "token id list": ("a list of token ids", _is_ids),
    "token id lists": ("a list of lists of token ids", lambda v: isinstance(v, list) and all(_is_ids(ids) for ids in v)),
    "biases": ("a list of [token ids, bias] pairs",  # a bias of -inf bans a sequence
               lambda v: isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and _is_ids(p[0])
                                                     and (_is_number(p[1]) or p[1] in (math.inf, -math.inf)) for p in v)),
    "decay": ("a pair [start index, decay factor]",
              lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and _is_int(v[0]) and _is_number(v[1])),
}


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding options. None means "as transformers would": the model's generation_config, else its global default."""

    do_sample: bool = False  # False: greedy (argmax after the processors), the default here whatever the model's config says
    temperature: float | None = None  # divides the logits before sampling; > 0 (ignored when greedy); transformers' default 1.0
    top_k: int | None = None  # keep the k most likely tokens; 0 turns it off; transformers' default 50
    top_p: float | None = None  # nucleus: the smallest set holding this much probability, in (0, 1]; default 1.0 (off)
    min_p: float | None = None  # drop tokens below min_p x the top probability, in [0, 1]; None or 0: off
    repetition_penalty: float | None = None  # in REPETITION_PENALTY_RANGE; penalizes tokens already in the sequence (CTRL),
    # also when greedy; 1.0: off
    seed: int = 0  # the sampling seed, as torch.manual_seed(seed) before generate; not the split schedule's --seed
    # The model file's MODEL_ENTRY_KINDS entries that are set, as (name, value) pairs with lists made tuples
    # (`resolved` fills it; the two-part split refuses them: the cloud chooses the token there and never sees the ids)
    model_entries: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        """Refuse out-of-range values with one line (transformers would raise deep inside generate)."""
        t, k, p, m, r = self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty
        if t is not None and (not math.isfinite(t) or t < 0 or (self.do_sample and t < MIN_TEMPERATURE)):
            raise TriadicError(f"--temperature {t}: must be at least {MIN_TEMPERATURE:g} when sampling (use greedy decoding instead)")
        if k is not None and not is_unsigned(k, 32):
            raise TriadicError(f"--top-k {k}: must be an integer in [0, 2**32) (0 turns it off)")
        if p is not None and not 0 < p <= 1:
            raise TriadicError(f"--top-p {p}: must be in (0, 1]")
        if m is not None and not 0 <= m <= 1:
            raise TriadicError(f"--min-p {m}: must be in [0, 1]")
        low, high = REPETITION_PENALTY_RANGE
        if r is not None and not low <= r <= high:
            raise TriadicError(f"--repetition-penalty {r}: must be in [{low:g}, {high:g}] (1 turns it off)")
        if not is_unsigned(self.seed, 64):
            raise TriadicError(f"--sampling-seed {self.seed}: must be an integer in [0, 2**64)")

    def resolved(self, model_defaults: GenerationConfig | None = None) -> SamplingConfig:
        """Every option explicit: unset ones from the model's GenerationConfig, else transformers' global defaults.

        This is the order `GenerationMixin._prepare_generation_config` applies; greedy decoding takes only the
        repetition penalty from the file, as generate ignores the others then. The file's other entries that decide
        the token (MODEL_ENTRY_KINDS) are kept in `model_entries`; what the split cannot apply, and what transformers
        itself refuses, is refused in one line. Without `model_defaults` the entries already resolved stay.
        """
        from transformers import GenerationConfig

        if model_defaults is None:
            entries, from_file = self.model_entries, {}
        else:
            entries = _model_entries(model_defaults, self.do_sample)
            from_file = {name: getattr(model_defaults, name) for name in OPTION_NAMES if getattr(self, name) is None
                         and getattr(model_defaults, name, None) is not None and (self.do_sample or name == "repetition_penalty")}
            for name, value in from_file.items():
                _check_file_option(name, value, self.do_sample, _named(model_defaults))
        global_defaults = GenerationConfig()._get_default_generation_params()
        values = {name: getattr(self, name) for name in OPTION_NAMES}
        values.update(from_file)
        values = {name: global_defaults.get(name) if value is None else value for name, value in values.items()}
        if values["min_p"] == 0:
            values["min_p"] = None  # min-p 0 keeps every token: transformers' warper would be a no-op
        values = {name: float(v) if name != "top_k" and v is not None else v for name, v in values.items()}
        if model_defaults is not None:  # transformers' own checks, as generate meets them: the file's values as written
            base = values if self.do_sample else {name: global_defaults.get(name) for name in OPTION_NAMES}  # greedy: the
            tried = {**base, "repetition_penalty": values["repetition_penalty"], **from_file}  # sampling options play no part
            every_entry = entries if self.do_sample else _model_entries(model_defaults, do_sample=True)
            trial = dataclasses.replace(self, **tried, do_sample=True, model_entries=every_entry)
            try:
                logits_processors(trial, prompt_ids=(0,), eos_token_ids=(0,))
            except (TypeError, ValueError, IndexError, RuntimeError) as error:
                raise TriadicError(f"{_named(model_defaults)}: {first_line(error)}") from None
        return dataclasses.replace(self, **values, model_entries=entries)

    def generation_config(self):
        """The transformers GenerationConfig of these options (resolve first: None means transformers' default)."""
        from transformers import GenerationConfig

        entries = {name: _thawed(value) for name, value in self.model_entries}
        with warnings.catch_warnings():  # its notes on options that greedy decoding ignores: the CLI's stderr stays clean
            warnings.simplefilter("ignore")
            return GenerationConfig(do_sample=self.do_sample, **{name: getattr(self, name) for name in OPTION_NAMES}, **entries)

    def check_vocabulary(self, vocab_size: int) -> None:
        """The token ids in the model file's entries are the model's: one line where one is not (transformers
        would fail at the first step, or index from the end of the vocabulary)."""
        for name, value in self.model_entries:
            ids = _token_ids(name, value)
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise TriadicError(f"the model's generation_config.json: {name} holds token id {bad[0]}, outside the "
                                   f"model's vocabulary of {vocab_size}")

    @property
    def edge_only(self) -> bool:
        """Whether only the edge can choose the token: the repetition penalty and the model file's entries read the
        sequence (n-grams, bad words, lengths) or are not carried to a two-part cloud (START holds the five options)."""
        return bool(self.model_entries) or (self.repetition_penalty is not None and self.repetition_penalty != 1.0)


def _named(model_defaults) -> str:
    """The file the model's generation options were read from, for a message."""
    return f"the model's {getattr(model_defaults, 'triadic_source', 'generation_config.json')}"


def _check_kind(name: str, kind: str, value, source: str) -> None:
    """A value of the model's file against the kind of value its entry must hold (`_KINDS`)."""
    described, holds = _KINDS[kind]
    if not holds(value):
        raise TriadicError(f"{source}: {name} must be {described}, not {value!r:.60}")


def _check_file_option(name: str, value, do_sample: bool, source: str) -> None:
    """One of the five options as the model's file gives it: of its kind, and in the range a flag would be."""
    _check_kind(name, "count" if name == "top_k" else "number", value, source)
    try:
        SamplingConfig(do_sample=do_sample, **{name: value})
    except TriadicError as error:  # its message names the flag ("--top-p 0: ..."); the value came from the file
        raise TriadicError(f"{source} sets {name} {value}: {str(error).split(': ', 1)[-1]}; --{name.replace('_', '-')} "
                           "overrides it") from None


def _model_entries(model_defaults: GenerationConfig, do_sample: bool) -> tuple[tuple[str, object], ...]:
    """The file's MODEL_ENTRY_KINDS entries that change a token, checked, for a request that samples or not; one
    line for an entry of the wrong kind, for one the split cannot apply, and for a file that makes generate do other
    than greedy decoding or sampling."""
    import copy

    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS, GenerationMode

    source = _named(model_defaults)
    for name in UNSUPPORTED_ENTRY_NAMES:
        value = getattr(model_defaults, name, None)
        if value not in (None, False) and not (name == "guidance_scale" and value == 1):
            raise TriadicError(f"{source} sets {name}, which generate applies and the split does not; remove it from the "
                               "file to run without it")
    cache = getattr(model_defaults, "cache_implementation", None)
    if (cache in ALL_STATIC_CACHE_IMPLEMENTATIONS and cache != "hybrid") or cache == "quantized":  # a file's "hybrid" generate
        # drops (`_prepare_generation_config`); "dynamic" and "offloaded" are the split's numerics
        raise TriadicError(f"{source} sets cache_implementation {cache!r:.30}: generate then attends over another cache, whose "
                           "sums differ in the last bits (and bf16 tokens at near-ties) from the split's; remove it from the file "
                           "to run without it")
    if getattr(model_defaults, "num_return_sequences", None) not in (None, 1):
        raise TriadicError(f"{source} sets num_return_sequences {model_defaults.num_return_sequences!r:.20}: generate "
                           "returns that many answers, the split one")
    global_defaults = GenerationConfig()._get_default_generation_params()
    as_generate = copy.deepcopy(model_defaults)  # as generate prepares it: its defaults fill what the file leaves unset
    as_generate.update(**global_defaults, defaults_only=True)
    as_generate.do_sample = do_sample
    mode = as_generate.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise TriadicError(f"{source} makes generate use {mode.value}, which the split does not do")
    entries = []
    for name, kind in MODEL_ENTRY_KINDS.items():
        value = getattr(model_defaults, name, None)
        if value is None or value == global_defaults.get(name) or (name in SAMPLING_ONLY_ENTRY_NAMES and not do_sample):
            continue
        _check_kind(name, kind, value, source)
        if _has_effect(name, value, model_defaults):
            entries.append((name, _frozen(value)))
    return tuple(entries)


def _has_effect(name: str, value, model_defaults) -> bool:
    """False for an entry that changes no token: a false flag, an empty suppression, min_new_tokens 0, and min_length
    where min_new_tokens is set (generate's `_prepare_generated_length` replaces it). So that a two-part split, which
    refuses the entries, does not refuse a file that spells out every field at its no-op."""
    if name == "min_length":
        return getattr(model_defaults, "min_new_tokens", None) is None
    if name in ("remove_invalid_values", "renormalize_logits", "suppress_tokens", "begin_suppress_tokens", "min_new_tokens"):
        return bool(value)
    return True


def two_part_refusal(config: SamplingConfig, asked: SamplingConfig | None = None,
                     source: str = "the model's generation_config.json") -> str:
    """The line that refuses `config` (resolved) in the two-part split, naming the flag or the file's entries.

    `asked` is the request before resolving: a penalty there is the user's flag, else it came from `source`."""
    if config.model_entries and not (asked is not None and asked.edge_only):
        names = ", ".join(name for name, _ in config.model_entries)
        return (f"{source} sets {names}, which the two-part split cannot apply (its cloud chooses the token and is "
                "sent the five options only)")
    why = "the cloud chooses the token and never sees the prompt's tokens"
    if asked is None or asked.edge_only:
        return f"--repetition-penalty: in the two-part split {why}"
    return (f"{source} sets repetition_penalty {config.repetition_penalty:g}, which the two-part split cannot apply "
            f"({why}); pass --repetition-penalty 1 to run without it")


def _token_ids(name: str, value) -> list[int]:
    """The token ids an entry holds (none for the entries of other kinds); `value` as `_frozen` keeps it."""
    kind = MODEL_ENTRY_KINDS[name]
    if kind == "biases":
        return [i for ids, _ in value for i in ids]  # ((ids), bias) pairs
    if kind == "token id lists":
        return [i for ids in value for i in ids]
    if kind in ("token id", "token ids", "token id list"):
        return list(value) if isinstance(value, tuple) else [value]
    return []


def _frozen(value):
    """A generation_config value with its lists as tuples, so that a SamplingConfig stays immutable and comparable."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _thawed(value):
    """`_frozen` undone, as transformers takes the value (its checks want lists)."""
    return [_thawed(v) for v in value] if isinstance(value, tuple) else value


class _ProcessorFactory:
    """Just enough of a model for `GenerationMixin._get_logits_processor`: a decoder-only config."""

    def __init__(self) -> None:
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(is_encoder_decoder=False)


def logits_processors(config: SamplingConfig, device: torch.device | str = "cpu", prompt_ids: Sequence[int] = (0,),
                      max_new_tokens: int = 1, eos_token_ids: Iterable[int] = ()) -> LogitsProcessorList:
    """transformers' own LogitsProcessorList for these options, built by transformers' own code and in its order.

    The request's prompt, new-token budget and end-of-sequence ids are what `generate` gives the processors that
    read them (min_new_tokens, forced_eos_token_id, the encoder_* entries, ...), and its lengths are prepared by
    `generate`'s own `_prepare_generated_length` (min_new_tokens, even 0, replaces min_length). The default prompt
    stands in where no processor reads one (the five options alone, a two-part cloud's)."""
    from transformers.generation.utils import GenerationMixin

    generation = config.generation_config()
    generation.max_new_tokens = max_new_tokens
    eos = sorted(set(eos_token_ids))
    generation._eos_token_tensor = torch.tensor(eos, device=device) if eos else None
    factory = type("ProcessorFactory", (_ProcessorFactory, GenerationMixin), {})()
    factory._prepare_generated_length(generation, has_default_max_length=True, has_default_min_length=True,
                                      model_input_name="input_ids", input_ids_length=len(prompt_ids), inputs_tensor=None)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    with warnings.catch_warnings():  # its notes on options it ignores, as in generation_config()
        warnings.simplefilter("ignore")
        return factory._get_logits_processor(generation, input_ids_seq_length=len(prompt_ids), encoder_input_ids=prompt,
                                             device=str(device))


class Sampler:
    """One request's token choice: processors built once, a generator seeded once (at the request's start)."""

    def __init__(self, config: SamplingConfig, device: torch.device | str = "cpu", prompt_ids: Sequence[int] = (0,),
                 max_new_tokens: int = 1, eos_token_ids: Iterable[int] = ()) -> None:
        """`config` must be resolved (every option explicit): both sides of a two-part split then agree exactly."""
        if any(getattr(config, name) is None for name in OPTION_NAMES if name != "min_p"):
            raise ValueError("Sampler needs a resolved SamplingConfig (SamplingConfig.resolved)")
        self.config = config
        try:  # transformers refuses some entries only with this request's eos ids (none: a length decay needs one)
            self.processors = logits_processors(config, device, prompt_ids, max_new_tokens, eos_token_ids)
        except (TypeError, ValueError, IndexError, RuntimeError) as error:
            raise TriadicError(f"the model's generation_config.json with this request: {first_line(error)}") from None
        self.generator = torch.Generator(device=device).manual_seed(config.seed) if config.do_sample else None

    @property
    def is_plain_greedy(self) -> bool:
        return not self.config.do_sample and len(self.processors) == 0

    def choose(self, logits: torch.Tensor, token_ids: list[int] | None = None) -> int:
        """The next token from the last position's logits ([vocab]), as `GenerationMixin._sample` picks it."""
        if self.is_plain_greedy:
            return int(logits.argmax())
        scores = logits.reshape(1, -1).to(dtype=torch.float32, copy=True)
        if self.config.edge_only and token_ids is None:
            raise ValueError("the repetition penalty and the model's generation_config entries need the sequence's token ids")
        try:  # values that pass every check and still fail here fail generate too (a decay whose power overflows, an
            # eos id past the vocabulary beside a decay, an infinite bias when sampling): one line, and the request ends
            if len(self.processors):
                scores = self.processors(torch.tensor([token_ids or []], dtype=torch.long, device=scores.device), scores)
            if not self.config.do_sample:
                return int(scores.argmax(dim=-1))
            probs = torch.nn.functional.softmax(scores, dim=-1)
            return int(torch.multinomial(probs, num_samples=1, generator=self.generator))
        except (ArithmeticError, IndexError, RuntimeError, ValueError) as error:
            raise TriadicError(f"choosing the token failed with these options and the model's generation_config.json "
                               f"entries: {first_line(error)}") from None


def model_generation_defaults(model_dir) -> GenerationConfig | None:
    """The model folder's generation options as `from_pretrained` gives them to `generate`: generation_config.json,
    else the generation entries of config.json (None where neither is there). One line for a file transformers
    refuses, as it refuses the model (such a file used to be ignored whole, end-of-sequence ids included)."""
    from transformers import GenerationConfig
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its note on a flag of the wrong kind: refused in one line of ours
    name = "generation_config.json"
    try:
        try:
            return GenerationConfig.from_pretrained(model_dir)
        except OSError:  # absent, unreadable or not JSON: transformers' from_pretrained then reads config.json's entries
            name = "config.json"
            generation = GenerationConfig.from_pretrained(model_dir, config_file_name=name, _from_model_config=True)
            generation.triadic_source = name  # for the messages (`_named`)
            return generation
    except OSError:
        return None
    except Exception as error:  # noqa: BLE001 - untrusted JSON: transformers raises ValueError, TypeError, AttributeError...
        raise TriadicError(f"{model_dir}/{name}: {first_line(error)}") from None
    finally:
        transformers_logging.set_verbosity(level)


class TextStream:
    """Generated tokens as text, decoded incrementally, with stop strings (`--stop`).

    Call `add(token)` per generated token: it returns True once the text contains a stop string (the answer's
    text, special tokens skipped, as vLLM matches; transformers' stop_strings also match across the prompt's end),
    which ends the generation (the tokens up to there stay in the result; the text is trimmed at the
    stop string's first occurrence, as vLLM and llama.cpp do). `write` receives the text that is
    final: a character is held back while it could still begin a stop string, and a multi-byte
    character until it is complete. Decoding costs O(new tokens) per token: only the last few
    tokens are decoded again (the offsets of text-generation-inference's incremental detokenizer).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] | list[str] = (), write=None) -> None:
        if any(not s for s in stop):
            raise TriadicError("--stop: a stop string must not be empty")
        for s in stop:  # a stop string with undecodable bytes could never match the text
            check_text(s, "--stop: a stop string")
        self.tokenizer, self.stop, self.write = tokenizer, tuple(stop), write
        self.tokens: list[int] = []
        self.text = ""
        self.shown = 0  # characters of text already written
        self.stopped = False
        self._prefix = self._read = 0  # token offsets: text of tokens[_prefix:_read] is already in self.text

    def add(self, token: int) -> bool:
        self.tokens.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.tokens[self._prefix : self._read])
        after = decode(self.tokens[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=1) + 1)
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)
            hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
        self._emit(final=self.stopped)
        return self.stopped

    def finish(self) -> str:
        """The generation ended: write what was held back; returns the whole (trimmed) text."""
        self._emit(final=True)
        return self.text

    def _emit(self, final: bool) -> None:
        hold = 0 if final else max((len(s) for s in self.stop), default=1) - 1
        end = max(self.shown, len(self.text) - hold)
        if self.write is not None and end > self.shown:
            self.write(self.text[self.shown : end])
        self.shown = end
