"""Batches on their way to the device: copied (non-blocking, from the loader's pinned memory) and
finished there (``data.augment_on: device``: the photometric half of the augmentation). On a GPU
the next batch is copied and finished on a side stream while the current one trains, so neither
the copy nor the augmentation sits in the step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["DeviceBatches", "to_device"]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, list):
        for v in batch:
            yield from _tensors(v)


class DeviceBatches:
    """``(host, device)`` pairs of the loader's batches: ``host`` as the loader gave it (hooks read
    it without a device sync), ``device`` copied and passed through ``finish``."""

    def __init__(self, batches: Iterable[Any], device: torch.device,
                 finish: Callable[[Any], Any] = lambda batch: batch) -> None:
        self.batches, self.device, self.finish = iter(batches), device, finish
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead = self._load() if self.stream is not None else None

    def _load(self) -> tuple[Any, Any] | None:
        host = next(self.batches, None)
        if host is None:
            return None
        if self.stream is None:
            return host, self.finish(to_device(host, self.device))
        with torch.cuda.stream(self.stream):
            return host, self.finish(to_device(host, self.device))

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> tuple[Any, Any]:
        if self.stream is None:
            pair = self._load()
        else:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            pair = self.ahead
            if pair is not None:
                for t in _tensors(pair[1]):
                    t.record_stream(current)  # made on the side stream, used on this one
                self.ahead = self._load()
        if pair is None:
            raise StopIteration
        return pair
