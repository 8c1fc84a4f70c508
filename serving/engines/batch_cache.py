"""The KV cache of every decoding sequence at once: one left-padded HF ``DynamicCache``.

Rows are right-aligned on a shared column axis, so for every row the distance between two KV
columns equals the distance between their positions: the causal and sliding-window masks HF
builds from ``cache_position`` stay right, and a 2-D padding mask hides each row's left padding.
Sliding-window layers keep only the last ``window - 1`` columns (HF's
``DynamicSlidingWindowLayer``), full-attention layers every column. Rows join with the cache of
their prefill (one sequence's, or a left-padded group's) and leave by index; leading columns no
remaining row uses are cut, so a finished long prompt frees its memory at the next token
boundary.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer


class BatchCache:
    """A ``DynamicCache`` over ``rows`` sequences plus their padding mask ``[rows, columns]``."""

    def __init__(self, config: PretrainedConfig, device: torch.device):
        self._config = config
        self._device = device
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def columns(self) -> int:
        """The shared (padded) length every row's next token is appended after."""
        return self.mask.shape[1]

    def new_prefill_cache(self) -> DynamicCache:
        """An empty cache to prefill newcomers into (one or a group), shaped like this one's layers."""
        return DynamicCache(config=self._config)

    def add(self, rows: DynamicCache, mask: torch.Tensor | None = None) -> None:
        """Append prefilled sequences as the last rows; ``mask [rows, length]`` marks their left padding (0)."""
        length = rows.get_seq_length()
        if mask is None:
            mask = torch.ones(rows.layers[0].keys.shape[0], length, dtype=torch.long, device=self._device)
        if self.cache is None:
            self.cache, self.mask = rows, mask
            return
        columns = max(self.columns, length)
        _pad_left(self.cache, columns)
        _pad_left(rows, columns)
        for mine, theirs in zip(self.cache.layers, rows.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([_pad_mask(self.mask, columns), _pad_mask(mask, columns)])

    def grow(self) -> torch.Tensor:
        """Extend the mask by one column for the token every row decodes next; returns the mask."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then cut the leading columns none of them uses."""
        if not rows:
            self.cache = None
            self.mask = self.mask[:0, :0]
            return
        index = torch.tensor(rows, device=self._device)
        take_rows(self.cache, index)
        self.mask = self.mask.index_select(0, index)
        unused = int(self.mask.cumsum(dim=1).eq(0).all(dim=0).sum())
        if unused:
            self._drop_leading(unused)

    def _drop_leading(self, columns: int) -> None:
        self.mask = self.mask[:, columns:]
        remaining = self.columns
        for layer in self.cache.layers:
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = remaining
                kept = min(remaining, layer.sliding_window - 1)
            else:
                kept = remaining
            layer.keys = layer.keys[:, :, layer.keys.shape[2] - kept :]
            layer.values = layer.values[:, :, layer.values.shape[2] - kept :]


def take_rows(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """Keep only the rows ``index`` of every layer of ``cache`` (in that order); returns it."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
    return cache


def _pad_left(cache: DynamicCache, columns: int) -> None:
    """Left-pad every layer of ``cache`` with zero keys and values to a shared length of ``columns``."""
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            stored = min(columns, layer.sliding_window - 1)
            layer.cumulative_length = columns
        else:
            stored = columns
        missing = stored - layer.keys.shape[2]
        if missing > 0:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, missing, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, missing, 0))


def _pad_mask(mask: torch.Tensor, columns: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (columns - mask.shape[1], 0))
