"""The KV codec interface (LMCache's serde, pluggable): how a chunk's keys and values become an entry's body,
and the registry of codecs by name.

A KV codec turns one KV tensor (keys or values, [layers, kv_heads, tokens, head_dim]) into named host tensors,
its "parts", and back. The framing (frame.py: `Codec`) stores the parts of keys and values in the entry's
safetensors body next to the token ids and records the codec's name and level and the tensors' `KVLayout`.
Decoding gives the tensor on the device asked for: the quantisers dequantise in torch there; the cachegen codec
also entropy-decodes there (a Triton kernel on CUDA, numpy on the host otherwise). `decodes_on_device` says
whether a GPU reader should decode on its GPU (the tiers' choice: Codec.decode_device). `round_trip` gives what
decoding an entry would give without building it (the quality benchmark's codec rows).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..kv import ChannelWeights

# Named host tensors: a KV codec's encoding of one tensor, stored under "keys." / "values." in the entry.
Parts = dict[str, torch.Tensor]
# Which of a chunk's two KV tensors a codec is given: a codec may quantise keys and values differently.
KVKind = Literal["keys", "values"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class KVLayout:
    """The shape and dtype of a chunk's keys (and of its values, the same): what the framing records in an entry's
    header and what a KV codec's decode must give back. Connects the framing (frame.py) and the KV codecs."""

    layers: int
    kv_heads: int
    tokens: int
    head_dim: int
    dtype: str  # a key of DTYPES: "float16", "bfloat16" or "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES or min(self.shape) < 0:
            raise ValueError(f"not a KV layout: shape {self.shape}, dtype {self.dtype!r}")

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "KVLayout":
        """The layout of a [layers, kv_heads, tokens, head_dim] tensor; ValueError for another rank or dtype."""
        if tensor.dim() != 4:
            raise ValueError(f"KV tensors are [layers, kv_heads, tokens, head_dim], got shape {tuple(tensor.shape)}")
        names = {dtype: name for name, dtype in DTYPES.items()}
        if tensor.dtype not in names:
            raise ValueError(f"KV tensors are float16, bfloat16 or float32, got {tensor.dtype}")
        return cls(*tensor.shape, dtype=names[tensor.dtype])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.layers, self.kv_heads, self.tokens, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class KVCodec(ABC):
    """One compression of a KV tensor at one level (0 .. levels - 1; higher: larger and more exact).

    Subclasses set `name` and `levels` and are registered with `@register`. `decode` may raise any exception for
    parts that do not fit the layout (damaged or mismatched): the framing turns that into a miss.
    """

    name: ClassVar[str]
    levels: ClassVar[int]
    # Whether decoding on a GPU beats decoding on the host and copying the KV up: True where decoding is work
    # (entropy decoding); False where it is a copy, which blending streams up from pinned host memory behind
    # compute, layer group by layer group.
    decodes_on_device: ClassVar[bool] = False
    # Whether `encode` spends its bits by the chunk's ChannelWeights (so that blending measures them, which costs
    # a few reductions a layer when it computes a chunk).
    uses_channel_weights: ClassVar[bool] = False

    def __init__(self, level: int = 0) -> None:
        if not 0 <= level < self.levels:
            raise ValueError(f"codec {self.name!r} has levels 0..{self.levels - 1}, not {level}")
        self.level = level

    @abstractmethod
    def encode(self, tensor: torch.Tensor, kind: KVKind, weights: ChannelWeights | None = None) -> Parts:
        """One KV tensor [layers, kv_heads, tokens, head_dim] (any device, a dtype of DTYPES), the chunk's keys or
        its values (`kind`), as host parts. `weights`: the chunk's channel weights (ChunkKV.weights; None where
        not measured), which a codec may spend its error by (the cachegen codec's bins); the others ignore them."""

    @abstractmethod
    def decode(self, parts: Parts, layout: KVLayout, device: torch.device) -> torch.Tensor:
        """The tensor `encode` was given (exactly, or within the codec's error bound), of `layout`'s shape and
        dtype, on `device`."""

    def round_trip(self, tensor: torch.Tensor, kind: KVKind, device: torch.device,
                   weights: ChannelWeights | None = None) -> torch.Tensor:
        """What decode(encode(tensor, kind, weights), KVLayout.of(tensor), device) gives, bit for bit: the tensor a
        tier storing this codec would give back (bench/quality.py blends from it). A codec whose encoding is
        costly past its quantisation (the cachegen codec's entropy coding) gives it without building the entry."""
        return self.decode(self.encode(tensor, kind, weights), KVLayout.of(tensor), device)

    def decode_all(self, tensors: list[Parts], layout: KVLayout, device: torch.device) -> list[torch.Tensor]:
        """`decode` of each tensor's parts (an entry's keys and values), all of `layout`. A codec may decode them
        together (the cachegen codec: one kernel launch for both)."""
        return [self.decode(parts, layout, device) for parts in tensors]


KV_CODECS: dict[str, type[KVCodec]] = {}


def register(cls: type[KVCodec]) -> type[KVCodec]:
    """Class decorator: makes a KV codec available by its name (`kv_codec`, the `chunk_cache.codec` setting)."""
    KV_CODECS[cls.name] = cls
    return cls


def kv_codec(name: str, level: int = 0) -> KVCodec:
    """The registered KV codec `name` at `level`; ValueError for an unknown name or a level it does not have."""
    if name not in KV_CODECS:
        raise ValueError(f"unknown KV codec {name!r}; known: {', '.join(sorted(KV_CODECS))}")
    return KV_CODECS[name](level)
