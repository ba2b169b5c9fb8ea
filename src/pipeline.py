"""Assemble an Edge and a Cloud from a checkpoint: who loads which tensors.

Each side reads only its own weights from the safetensors files. In one process the two sides
still share nothing: they talk through `LocalLink`, in bytes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from .checkpoint import load_config, load_tokenizer, read_tensors, resolve_model_dir
from .cloud import Cloud
from .edge import Edge
from .families import family_for
from .link.codec import get_codec
from .link.local import Link, LocalLink
from .models import FirstLlamaForCausalLM, SecondLlamaForCausalLM, ThirdLlamaForCausalLM
from .schedule import SplitSchedule
from .utils import TriadicError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise TriadicError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}") from None


@dataclass(frozen=True)  # frozen: one default instance serves every signature that takes it
class SideOptions:
    """Where and how one side computes."""

    device: str = "cpu"  # torch device of the side's weights and caches
    dtype: torch.dtype = torch.float32  # compute dtype (`--dtype`, resolved from auto by precision.resolve_dtype)
    load_in_8bit: bool = False  # LLM.int8() weights for the decoder layers (bitsandbytes)

    def stores_column_major(self, wanted: bool) -> bool:
        """Whether a side that `wanted` column-major weights gets them: not where they are quantized to int8 after
        loading, which reads them as transformers lays them out."""
        return wanted and not self.load_in_8bit


@dataclass(frozen=True)
class RemoteCloud:
    """A cloud server (src/serve/cloud_server.py) for the edge to talk to over gRPC, instead of a cloud built in this process."""

    url: str  # grpc://host:port; several, comma-separated, are clouds to fail over to (`--cloud`)
    tls_ca_path: str | None = None  # PEM file of the CA that signed the server's certificate; None: plaintext (`--tls-ca`)
    token_file_path: str | None = None  # file holding the bearer token the server requires (`--token-file`)
    timeout: float = 120.0  # seconds to wait for one reply before the link fails over or gives up (`--cloud-timeout`)
    tls_server_name: str | None = None  # the name the certificate carries, where the URL's host differs (`--tls-server-name`)


def _maybe_quantize(parts, side: SideOptions) -> None:
    """--load-in-8bit: LLM.int8() weights for the decoder layers a side holds."""
    if side.load_in_8bit:
        from .quantize import quantize_linear_layers_8bit

        for part in parts:
            quantize_linear_layers_8bit(part)


def link_gains(model_dir: Path, config, schedule: SplitSchedule) -> dict[int, torch.Tensor]:
    """Per cut of the schedule, the gain the receiving layer's norm gives each channel, where the family
    weighs its lossy link by it (`Family.link_gain_offset`); clamped at a tenth of the mean so that no
    channel is divided by almost nothing. A few norm vectors per side, read like any other tensor."""
    family = family_for(config)
    if family.link_gain_offset is None:
        return {}
    L = config.num_hidden_layers
    cuts = sorted(set(schedule.first) | set(schedule.second))
    names = {str(c): f"model.layers.{c}.input_layernorm.weight" if c < L else f"model.{family.norm}.weight" for c in cuts}
    weights = read_tensors(model_dir, names, torch.float32, "cpu")
    gains = {}
    for c in cuts:
        gain = (family.link_gain_offset + weights[str(c)]).abs()
        gains[c] = gain.clamp_min(0.1 * float(gain.mean()))
    return gains


def build_edge(
    model_dir: Path, config, schedule: SplitSchedule, codec_name: str, two_part: bool = False,
    lora_weights: str | None = None, side: SideOptions = SideOptions(), link=None, column_major: bool = False,
) -> Edge:
    """The edge's parts; `column_major`: their layers' fp32 weights stored transposed (`SplitLlamaForCausalLM.from_checkpoint`)."""
    column_major = side.stores_column_major(column_major)
    first = FirstLlamaForCausalLM.from_checkpoint(
        model_dir, config, schedule.edge_first_layers, side.dtype, side.device, lora_weights, column_major=column_major
    )
    third = None
    if not two_part:
        embeddings = first.model.embed_tokens
        assert embeddings is not None  # the first part always holds them
        tied = {"lm_head.weight": embeddings.weight} if config.tie_word_embeddings else None
        third = ThirdLlamaForCausalLM.from_checkpoint(
            model_dir, config, schedule.edge_third_layers, side.dtype, side.device, lora_weights, shared=tied,
            column_major=column_major,
        )
    _maybe_quantize([first] + ([third] if third else []), side)
    first.link_gains = link_gains(model_dir, config, schedule)
    codec = get_codec(codec_name)
    codec.prepare()
    return Edge(schedule, first, third, codec, link)


def cloud_part_class(two_part: bool) -> type[SecondLlamaForCausalLM | ThirdLlamaForCausalLM]:
    """The cloud's part: the middle layers, or in the two-part split the layers after the cut with norm and head."""
    return ThirdLlamaForCausalLM if two_part else SecondLlamaForCausalLM


def build_cloud(
    model_dir: Path, config, schedule: SplitSchedule, two_part: bool = False,
    lora_weights: str | None = None, side: SideOptions = SideOptions(), column_major: bool = False,
) -> Cloud:
    part = cloud_part_class(two_part).from_checkpoint(model_dir, config, schedule.cloud_layers, side.dtype, side.device,
                                                      lora_weights, column_major=side.stores_column_major(column_major))
    _maybe_quantize([part], side)
    part.link_gains = link_gains(model_dir, config, schedule)
    return Cloud(schedule, part)


@dataclass
class Pipeline:
    model_dir: Path
    config: PretrainedConfig
    tokenizer: object
    schedule: SplitSchedule
    edge: Edge
    cloud: Cloud | None


def build_pipeline(
    base_model: str | None, first: set[int], second: set[int], codec_name: str = "none", seed: int = 0,
    resplit_every: int = 1, two_part: bool = False, lora_weights: str | None = None,
    edge_side: SideOptions = SideOptions(), cloud_side: SideOptions = SideOptions(), with_tokenizer: bool = True,
    remote: RemoteCloud | None = None,
) -> Pipeline:
    """Edge and (where some step has a < b) Cloud, linked by bytes.

    Without `remote` the cloud is built in this process (LocalLink); with it, only the edge is
    built here and talks to a cloud server over gRPC (see src/serve/cloud_server.py), which must run the same
    model, split sets and mode.

    A lossy codec changes the hidden states far beyond the last bits of a product, so its sides store
    their fp32 weights in the layout that is faster over several rows (`from_checkpoint`'s `column_major`),
    and on a CPU with AVX-512 as panels (`use_panels_where_they_run`); a lossless run keeps
    transformers' layout, so that it computes what HF computes bit for bit.
    """
    column_major = not get_codec(codec_name).lossless  # an unknown codec is refused before any weights are read
    model_dir = resolve_model_dir(base_model)
    config = load_config(model_dir)
    schedule = SplitSchedule(tuple(first), tuple(second), config.num_hidden_layers, seed, resplit_every)
    tokenizer = load_tokenizer(model_dir) if with_tokenizer else None
    needs_cloud = schedule.needs_cloud
    if two_part and needs_cloud and schedule.first[-1] == schedule.num_layers:
        raise TriadicError(f"two-part split: first may contain {schedule.num_layers} (= L) only alone, as the unsplit baseline")
    two_part = two_part and needs_cloud  # first = {L}: the edge runs everything and keeps the head
    cloud: Cloud | None = None
    link: Link | None = None
    if needs_cloud and remote is not None:
        from .link.grpc_link import make_link

        link = make_link(remote.url, remote.tls_ca_path, remote.token_file_path, remote.timeout, remote.tls_server_name)
    elif needs_cloud:
        cloud = build_cloud(model_dir, config, schedule, two_part, lora_weights, cloud_side, column_major)
        link = LocalLink(cloud)
    edge = build_edge(model_dir, config, schedule, codec_name, two_part, lora_weights, edge_side, link, column_major)
    if column_major:
        use_panels_where_they_run(edge.parts + (cloud.parts if cloud is not None else []))
    return Pipeline(model_dir, config, tokenizer, schedule, edge, cloud)


def use_panels_where_they_run(parts) -> None:
    """A lossy run's fp32 (or bf16) CPU layers on a CPU with AVX-512 (and AVX512_BF16): products in the panel kernel.

    Moving cuts run chunks of 2-3 positions, and MKL's product over a few rows repacks the weight at every
    call: at hidden 4096 on an AMD EPYC (4 layers, one thread, interleaved with HF `generate`), moving int8
    ran at 0.83x of HF with MKL and 1.20x with panels, fixed int8 at 1.01x and 1.15x. A row's product does
    not depend on the rows beside it (nor on the thread count), but sums in another order than MKL: lossy
    runs only. Where the kernel cannot run (fp16, a GPU, no AVX-512 or compiler, bf16 without AVX512_BF16) the
    weights stay as `from_checkpoint` laid them out."""
    from .panels import use_panels

    for part in parts:
        reason = use_panels(part)
        if reason is not None:
            logger.debug("a lossy side's products stay torch's: %s", reason)
            return
