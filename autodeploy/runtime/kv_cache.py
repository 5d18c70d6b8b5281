"""The KV cache manager: cache tensors, page and state-slot bookkeeping, sizing.

One ``CacheInterface`` per built model (``ctx.cache`` during the build). It exists before the
cache_init stage, so ``insert_cached_*`` transforms register the caches each layer needs
(``CacheSpec``); ``initialize`` allocates them and ``resize`` re-sizes the paged ones.

- Paged caches (K/V) are ``[num_pages, page_size, ...]``; a sequence owns a list of pages.
- State caches (SSM/conv state) are ``[num_slots, ...]``; a running sequence owns one slot.
- Page 0 and slot 0 are scratch: never handed to a request, so padded/sample batches can write
  there without touching live data. Unused page-table entries are 0 and point at it.

Sizing: on CPU the cache holds ``max_batch_size`` full sequences; on GPU it starts small (enough
for one max-token forward and one full sequence) and ``resize_kv_cache`` grows it from free memory.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from .sequence_info import SequenceInfo

if TYPE_CHECKING:
    from ..config.schema import AutoDeployArgs

log = logging.getLogger(__name__)

# used when args.max_num_tokens is None: max_batch_size * max_seq_len, capped
DEFAULT_MAX_NUM_TOKENS_CAP = 8192


@dataclass(frozen=True)
class CacheSpec:
    name: str  # graph input name, e.g. k_cache_3
    entry_shape: tuple[int, ...]  # shape of one page (paged) or one slot (state)
    dtype: torch.dtype
    paged: bool


class OutOfPages(RuntimeError):
    pass


class CacheInterface:
    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        max_num_tokens: Optional[int] = None,
        page_size: int = 64,
        device: "str | torch.device" = "cpu",
    ):
        if min(max_batch_size, max_seq_len, page_size) < 1:
            raise ValueError("max_batch_size, max_seq_len and attn_page_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_num_tokens = max_num_tokens or min(max_batch_size * max_seq_len, DEFAULT_MAX_NUM_TOKENS_CAP)
        self.page_size = page_size
        self.device = torch.device(device)
        self.pages_per_seq = math.ceil(max_seq_len / page_size)
        self.num_pages = self._initial_num_pages()
        self.num_slots = max_batch_size + 1
        self.specs: dict[str, CacheSpec] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.info = SequenceInfo(max_batch_size, self.max_num_tokens, self.pages_per_seq, self.device)
        self._free_pages: list[int] = []
        self._free_slots: list[int] = []
        self._reset_free_lists()

    @classmethod
    def from_args(cls, args: "AutoDeployArgs", device: "str | torch.device") -> "CacheInterface":
        """From the experiment's typed ``args`` (max_batch_size, max_seq_len, max_num_tokens, attn_page_size)."""
        return cls(max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                   max_num_tokens=args.max_num_tokens, page_size=args.attn_page_size, device=device)

    def _initial_num_pages(self) -> int:
        full = self.max_batch_size * self.pages_per_seq
        if self.device.type == "cuda":
            # enough for the sizing forward (max_num_tokens) and one full sequence; resize grows it
            probe = math.ceil(self.max_num_tokens / self.page_size) + self.max_batch_size
            full = min(full, max(probe, self.pages_per_seq))
        return full + 1  # + scratch page 0

    # ---- cache tensors ----

    def add_cache(self, spec: CacheSpec) -> None:
        if self.tensors:
            raise RuntimeError(f"cache {spec.name!r} registered after the caches were allocated")
        self.specs[spec.name] = spec

    @property
    def bytes_per_page(self) -> int:
        return sum(_nbytes(s.entry_shape, s.dtype) for s in self.specs.values() if s.paged)

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def initialize(self) -> None:
        """Allocate every registered cache (zeros) with the current ``num_pages`` / ``num_slots``."""
        self.tensors = {name: self._allocate(spec) for name, spec in self.specs.items()}

    def resize(self, num_pages: int) -> None:
        """Re-allocate the paged caches with ``num_pages`` pages (only while no request holds pages)."""
        if self.num_used_pages:
            raise RuntimeError("cannot resize the KV cache while requests hold pages")
        if num_pages < self.pages_per_seq + 1:
            raise ValueError(
                f"{num_pages} KV pages cannot hold one sequence of max_seq_len={self.max_seq_len} "
                f"({self.pages_per_seq} pages of {self.page_size} tokens + 1 scratch page)"
            )
        self.num_pages = num_pages
        for name, spec in self.specs.items():
            if spec.paged and name in self.tensors:
                del self.tensors[name]  # free before allocating the new size
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        for name, spec in self.specs.items():
            if spec.paged:
                self.tensors[name] = self._allocate(spec)
        self._reset_free_lists()

    def _allocate(self, spec: CacheSpec) -> torch.Tensor:
        count = self.num_pages if spec.paged else self.num_slots
        return torch.zeros((count, *spec.entry_shape), dtype=spec.dtype, device=self.device)

    # ---- pages and slots ----

    def _reset_free_lists(self) -> None:
        # stacks: pop() hands out the lowest ids first
        self._free_pages = list(range(self.num_pages - 1, 0, -1))
        self._free_slots = list(range(self.num_slots - 1, 0, -1))

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - 1 - len(self._free_pages)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def pages_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    def allocate_pages(self, count: int) -> list[int]:
        if count > len(self._free_pages):
            raise OutOfPages(f"need {count} KV pages, {len(self._free_pages)} free")
        return [self._free_pages.pop() for _ in range(count)]

    def free_pages(self, pages: list[int]) -> None:
        self._free_pages.extend(reversed(pages))

    def allocate_slot(self) -> int:
        if not self._free_slots:
            raise OutOfPages("no free state slot")
        return self._free_slots.pop()

    def free_slot(self, slot: int) -> None:
        self._free_slots.append(slot)

    def __repr__(self) -> str:
        return (
            f"CacheInterface(pages={self.num_pages}x{self.page_size} tokens, slots={self.num_slots}, "
            f"caches={len(self.specs)}, {self.total_bytes / 2**20:.1f} MiB on {self.device})"
        )


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
