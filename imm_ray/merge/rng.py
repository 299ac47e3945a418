"""Counter-based random numbers for DARE masks.

Element ``i`` of random stream ``s`` (one stream per input model) of tensor ``name`` is a pure function
of ``(seed, name, s, i)``: the stream is a PCG64-DXSM generator keyed by a hash of ``(seed, name, s)``
and advanced (O(log n) jump) to element ``i``, 16 random bits per element. Masks therefore do not depend
on block sizes, the number of threads or the order in which tensors are processed, and any row block can be
drawn on its own.

They are *not* bit-identical to MergeLM's masks (MergeLM draws ``torch.bernoulli`` from one global
torch generator); the distribution is the same up to the 16-bit resolution: each entry is dropped
independently with probability ``round(p * 2**16) / 2**16`` (within 7.7e-6 of ``p``). DARE still
rescales by exactly ``1 / (1 - p)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

RNG_ALGORITHM = "pcg64dxsm-counter-u16/v1"
_U16_RANGE = 1 << 16


class TensorRNG:
    """Random streams of one tensor, starting at flat element ``offset`` (see the module doc)."""

    __slots__ = ("name", "offset", "seed")

    def __init__(self, seed: int, name: str, offset: int = 0) -> None:
        self.seed = int(seed)
        self.name = name
        self.offset = int(offset)

    def at(self, offset: int) -> TensorRNG:
        """The same streams, starting ``offset`` elements further (for a block of the tensor)."""
        return TensorRNG(self.seed, self.name, self.offset + offset)

    def _key(self, stream: int) -> int:
        text = f"{self.seed}\x00{self.name}\x00{stream}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little")

    def uint16(self, stream: int, count: int) -> np.ndarray:
        """``count`` uniform uint16 values: elements ``offset .. offset + count`` of ``stream``."""
        first, skip = divmod(self.offset, 4)
        bitgen = np.random.PCG64DXSM(np.random.SeedSequence(self._key(stream)))
        bitgen.advance(first)
        raw = bitgen.random_raw((skip + count + 3) // 4)
        return raw.view("<u2")[skip : skip + count]

    def keep_mask(
        self, stream: int, shape: Sequence[int], p: float, out: np.ndarray | None = None
    ) -> np.ndarray:
        """float32 array of 0/1 (1 = keep; into ``out`` if given, contiguous float32 of ``shape``);
        each entry is dropped with probability ``p`` (16-bit resolution)."""
        shape = tuple(int(d) for d in shape)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        threshold = np.uint16(min(round(float(p) * _U16_RANGE), _U16_RANGE - 1))
        bits = self.uint16(stream, out.size)
        np.greater_equal(bits, threshold, out=out.reshape(-1), casting="unsafe")
        return out
