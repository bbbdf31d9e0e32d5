"""Exact k-th smallest value of a stream of non-negative floats, without holding the stream.

The fused loss needs, for a quantile pace, the k-th smallest clamped hardness over all of a
level's negative pairs (``O(N^2)`` values) while it may hold only one tile of them. A radix
select does it exactly: the bit pattern of a non-negative IEEE float, read as an integer,
orders as the float does, so the k-th value is found one 16-bit digit at a time, from the top:

* a **histogram pass** counts, over the whole stream (every tile recomputed), the values whose
  higher digits equal the prefix found so far, by their next digit (65,536 bins); the bin
  where the cumulative count reaches ``k`` is the next digit;
* once that bin holds at most :data:`GATHER` values and digits remain, a **gather pass**
  collects them and ``kthvalue`` finishes.

float32 needs at most two passes (a 15-bit and a 16-bit digit), float64 at most four (in
practice two: the second gathers). Memory: one ``(65,536,)`` histogram per selection, plus
at most :data:`GATHER` gathered values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["GATHER", "HINT_BINS", "RadixSelect"]

#: Largest bin that a gather pass collects instead of another histogram pass.
GATHER = 1 << 16
#: Top-digit bins either side of a hint's that the first pass gathers.
HINT_BINS = 8
_BITS = 16
_BINS = 1 << _BITS


class RadixSelect:
    """k-th smallest (1-based) of a stream of non-negative float32/float64 values fed tile by tile.

    Usage: while not ``done``: ``begin()``, ``feed(values, mask)`` for every tile of the
    stream, ``end()``; then ``result`` is the 0-dim value (in the stream's dtype), or ``None``
    when ``rank`` said so. Every pass must feed the same stream (the order may differ).

    Args:
        rank: ``k``, or ``fn(count) -> k | None`` called with the stream's length after the
            first pass (``None``: nothing to select, e.g. an empty stream).
        dtype: the stream's dtype.
        device: where the histograms live.
        hint: a guess of the result (e.g. the previous step's); the first pass then also
            gathers the values of its top-digit bin and the :data:`HINT_BINS` bins either side
            (at most :data:`GATHER` values), and when the k-th value falls among them the
            selection ends after one pass. Never changes the result, only the passes.
    """

    def __init__(
        self,
        rank: int | Callable[[int], int | None],
        dtype: torch.dtype,
        device: torch.device,
        hint: float | None = None,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Expected a float32 or float64 stream, but got {dtype}")
        self.rank = rank
        self.k = rank if isinstance(rank, int) else 0
        self.dtype = dtype
        self.device = device
        self.int_dtype = torch.int32 if dtype == torch.float32 else torch.int64
        self.total = 32 if dtype == torch.float32 else 64
        self.shift = self.total  # bits below the known prefix
        self.prefix = 0  # the known high bits
        self.gathering = False
        self.done = False
        self.passes = 0
        self.result: Tensor | None = None
        self._hist: Tensor | None = None
        self._parts: list[Tensor] = []
        self._window: tuple[int, int] | None = None  # first pass: top digits gathered for the hint
        self._window_size = 0
        if hint is not None and hint >= 0 and hint == hint:
            key = int(torch.tensor([hint], dtype=dtype).view(self.int_dtype)[0])
            top = key >> (self.total - _BITS)
            self._window = (max(0, top - HINT_BINS), top + HINT_BINS)

    def begin(self) -> None:
        """Start a pass."""
        if self.gathering:
            self._parts = []
        else:
            self._hist = torch.zeros(_BINS + 1, dtype=torch.long, device=self.device)

    def _keys(self, values: Tensor) -> Tensor:
        return values.to(self.dtype).contiguous().view(self.int_dtype)

    def feed(self, values: Tensor, mask: Tensor | None = None) -> None:
        """Add one tile: ``values`` any shape, >= 0 and not NaN (``+0.0``, not ``-0.0``); ``mask`` selects."""
        keys = self._keys(values)
        first = self.shift == self.total
        ok = (
            mask
            if first
            else ((keys >> self.shift) == self.prefix if mask is None else mask & ((keys >> self.shift) == self.prefix))
        )
        if self.gathering:
            self._parts.append(values.reshape(-1) if ok is None else values[ok])
            return
        digit = keys >> (self.shift - _BITS)
        if not first:
            digit = digit & (_BINS - 1)
        if first and self._window is not None:
            lo, hi = self._window
            near = (digit >= lo) & (digit <= hi)
            if ok is not None:
                near &= ok
            picked = values[near]
            self._window_size += picked.numel()
            if self._window_size <= GATHER:
                self._parts.append(picked)
            else:
                self._window, self._parts = None, []
        if ok is not None:
            digit = torch.where(ok, digit, torch.full_like(digit, _BINS))
        if self._hist is None:
            raise RuntimeError("RadixSelect.feed before begin")
        self._hist += torch.bincount(digit.reshape(-1), minlength=_BINS + 1)[: _BINS + 1]

    def end(self) -> None:
        """Finish a pass: fix the next digit, or (after a gather pass) the result."""
        self.passes += 1
        if self.gathering:
            vals = torch.cat(self._parts).to(self.dtype) if self._parts else torch.zeros(0, dtype=self.dtype)
            self.result = torch.kthvalue(vals, self.k).values
            self.done = True
            return
        if self._hist is None:
            raise RuntimeError("RadixSelect.end before begin")
        cum = self._hist[:_BINS].cumsum(0)
        if not isinstance(self.rank, int):  # the first pass counted the stream
            k = self.rank(int(cum[-1]))
            self.rank = -1
            if k is None:
                self.done = True
                return
            self.k = int(k)
        b = int(torch.searchsorted(cum, torch.tensor([self.k], device=cum.device))[0])
        if b >= _BINS:
            raise RuntimeError(f"k-th value {self.k} beyond the stream's {int(cum[-1])} values")
        if self.shift == self.total and self._window is not None and self._window[0] <= b <= self._window[1]:
            lo = self._window[0]
            below = int(cum[lo - 1]) if lo > 0 else 0
            vals = torch.cat(self._parts).to(self.dtype)  # exactly the values of bins lo..hi
            self.result = torch.kthvalue(vals, self.k - below).values
            self.done = True
            return
        self._parts = []
        below = int(cum[b - 1]) if b > 0 else 0
        in_bin = int(self._hist[b])
        self.k -= below
        self.prefix = (self.prefix << _BITS) | b
        self.shift -= _BITS
        if self.shift == 0:
            bits = torch.tensor([self.prefix], dtype=torch.int64)
            self.result = bits.to(self.int_dtype).view(self.dtype)[0].to(self.device)
            self.done = True
        elif in_bin <= GATHER:
            self.gathering = True
