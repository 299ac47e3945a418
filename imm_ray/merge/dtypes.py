"""Tensor dtypes of safetensors files, handled with numpy alone (the merge engine never imports torch).

numpy has no bfloat16 or float8: such tensors are held in their raw storage (uint16 / uint8 arrays)
and converted to and from float32 here. bfloat16 -> float32 is exact (a 16-bit shift); float32 ->
bfloat16 rounds to nearest, ties to even, like torch's ``.to(torch.bfloat16)`` for finite values,
so outputs are byte-identical to a torch implementation. float8 conversions (rare: copy-through
tensors of quantised checkpoints) borrow torch, imported only then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import MergeError

__all__ = ["DType", "FLOAT32", "BFLOAT16", "dtype_from_safetensors", "parse_dtype"]


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its names, size, and how its raw bytes are held in numpy."""

    name: str  # torch's name, e.g. "bfloat16" (config.json, provenance)
    st: str  # safetensors header name, e.g. "BF16"
    storage: np.dtype  # numpy dtype of the raw storage (uint16 for bfloat16)
    is_floating_point: bool
    overflow: float = math.inf  # float32 magnitudes from here on are not finite in this dtype

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    def __str__(self) -> str:
        return self.name

    def to_float32(self, raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 values of ``raw`` (this dtype's storage), into ``out`` if given."""
        if out is None:
            out = np.empty(raw.shape, dtype=np.float32)
        if self.st == "BF16":
            bits = out.view(np.uint32)
            bits[...] = raw
            bits <<= 16
        elif self.st.startswith("F8"):
            out[...] = self._as_torch(raw).float().numpy()
        else:
            out[...] = raw
        return out

    def from_float32(self, values: np.ndarray, out: np.ndarray | None = None,
                     scratch: np.ndarray | None = None) -> np.ndarray:
        """Finite float32 ``values`` in this dtype's storage, into ``out`` if given; ``scratch``: an
        optional uint32 buffer of the same size for the bfloat16 rounding. Check ``fits`` first:
        NaN has no defined result here."""
        if out is None:
            out = np.empty(values.shape, dtype=self.storage)
        if self.st == "BF16":
            bits = values.view(np.uint32)
            rounded = np.right_shift(bits, 16, out=scratch)
            rounded &= 1
            rounded += 0x7FFF
            rounded += bits
            rounded >>= 16
            out[...] = rounded
        elif self.st.startswith("F8"):
            import torch

            out[...] = torch.from_numpy(np.ascontiguousarray(values)).to(self._torch_dtype()).view(torch.uint8).numpy()
        else:
            out[...] = values
        return out

    def fits(self, values: np.ndarray) -> bool:
        """True if every float32 value is finite and stays finite when converted to this dtype."""
        if values.size == 0:
            return True
        if self.st.startswith("F8"):
            return self.all_finite(self.from_float32(values))
        low, high = float(np.min(values)), float(np.max(values))  # NaN propagates: both False
        return -self.overflow < low and high < self.overflow

    def all_finite(self, raw: np.ndarray) -> bool:
        """True unless ``raw`` (this dtype's storage) holds a NaN or an infinity."""
        if not self.is_floating_point or raw.size == 0:
            return True
        if self.st == "BF16":
            return int(np.max(raw & np.uint16(0x7F80))) != 0x7F80
        if self.st.startswith("F8"):
            return bool(self._as_torch(raw).float().isfinite().all())
        return bool(np.isfinite(np.min(raw))) and bool(np.isfinite(np.max(raw)))

    def _torch_dtype(self) -> Any:
        """The torch dtype (float8 only: numpy has none; torch is imported only then)."""
        import torch

        return getattr(torch, self.name)

    def _as_torch(self, raw: np.ndarray) -> Any:
        """``raw`` storage viewed as a torch tensor of this dtype (float8 only)."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(raw)).view(self._torch_dtype())


FLOAT32 = DType("float32", "F32", np.dtype("<f4"), True)
# float32 values at or above 0x7F7F8000 (in magnitude) round up to inf in bfloat16
BFLOAT16 = DType("bfloat16", "BF16", np.dtype("<u2"), True,
                 float(np.array([0x7F7F8000], dtype=np.uint32).view(np.float32)[0]))
_ALL = (
    DType("float64", "F64", np.dtype("<f8"), True),
    FLOAT32,
    DType("float16", "F16", np.dtype("<f2"), True, 65520.0),
    BFLOAT16,
    DType("float8_e4m3fn", "F8_E4M3", np.dtype("u1"), True),
    DType("float8_e5m2", "F8_E5M2", np.dtype("u1"), True),
    DType("int64", "I64", np.dtype("<i8"), False),
    DType("int32", "I32", np.dtype("<i4"), False),
    DType("int16", "I16", np.dtype("<i2"), False),
    DType("int8", "I8", np.dtype("i1"), False),
    DType("uint64", "U64", np.dtype("<u8"), False),
    DType("uint32", "U32", np.dtype("<u4"), False),
    DType("uint16", "U16", np.dtype("<u2"), False),
    DType("uint8", "U8", np.dtype("u1"), False),
    DType("bool", "BOOL", np.dtype("?"), False),
)
_BY_ST = {d.st: d for d in _ALL}
_BY_NAME = {d.name: d for d in _ALL}
_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}


def dtype_from_safetensors(st: str) -> DType | None:
    """The DType of a safetensors header name (``"BF16"``), None if unsupported."""
    return _BY_ST.get(st)


def parse_dtype(name: str | DType) -> DType:
    """``"bf16"`` / ``"bfloat16"`` / ``"torch.bfloat16"`` / a floating DType -> DType."""
    if isinstance(name, DType):
        if not name.is_floating_point:
            raise MergeError(f"output dtype must be floating point, got {name}")
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _ALIASES:
        raise MergeError(f"unknown dtype {name!r} (use one of {sorted(_ALIASES)})")
    return _BY_NAME[_ALIASES[key]]
