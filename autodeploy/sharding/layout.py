"""How a sharded tensor axis is divided among the ranks of a group.

An axis is a concatenation of components (``Part``): e.g. a fused QKV projection's output is
``[q | k | v]``, a Mamba in_proj's output is ``[z | x | B | C | dt]``. Each component is split
on its own into contiguous, equal pieces of whole units (a unit is a head, or a group): that is
what "slice each component, not the concatenation" means. When a component has fewer units
than there are ranks (e.g. 2 KV heads on 4 ranks), its pieces are replicated: consecutive ranks
share one piece, which keeps GQA's query-to-KV-head mapping intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


class LayoutError(ValueError):
    """The axis cannot be split evenly in whole units among the ranks."""


@dataclass(frozen=True)
class Part:
    size: int  # full length of this component
    unit: int = 1  # elements that must stay on one rank (a head: head_dim)

    def pieces(self, world: int) -> int:
        """How many distinct pieces the component is cut into (< world means replicated pieces)."""
        if self.size % self.unit:
            raise LayoutError(f"component of size {self.size} is not a whole number of units of {self.unit}")
        units = self.size // self.unit
        pieces = min(world, units)
        if units % pieces or world % pieces:
            raise LayoutError(
                f"{units} units of {self.unit} cannot be split evenly among {world} ranks"
                + (" (replicating them needs world_size to be a multiple of their number)" if units < world else "")
            )
        return pieces

    def local(self, rank: int, world: int) -> tuple[int, int]:
        """[start, stop) of this rank's piece within the component."""
        pieces = self.pieces(world)
        length = self.size // pieces
        piece = rank // (world // pieces)
        return piece * length, (piece + 1) * length

    def scaled(self, factor: int) -> "Part":
        """The same split seen on an axis ``factor`` times finer (e.g. heads -> heads*head_dim)."""
        return Part(self.size * factor, self.unit * factor)


Layout = tuple[Part, ...]


def check(layout: Sequence[Part], world: int) -> None:
    for part in layout:
        part.pieces(world)


def local_ranges(layout: Sequence[Part], rank: int, world: int) -> list[tuple[int, int]]:
    """This rank's [start, stop) ranges in the full axis, one per component, in axis order."""
    out, offset = [], 0
    for part in layout:
        start, stop = part.local(rank, world)
        out.append((offset + start, offset + stop))
        offset += part.size
    return out


def local_size(layout: Sequence[Part], rank: int, world: int) -> int:
    return sum(stop - start for start, stop in local_ranges(layout, rank, world))


def full_size(layout: Sequence[Part]) -> int:
    return sum(p.size for p in layout)


def split_layout(layout: Sequence[Part], sizes: Sequence[int], cut: bool = False) -> list[Layout]:
    """Cut a layout at the boundaries of a ``split_with_sizes(sizes)``: each piece is a run of whole
    components. ``cut=True`` (used while building a layout, before anything is sliced) may also
    cut a component in two at a unit boundary, e.g. an unfused ``[gate | up]`` output."""
    parts, out = list(layout), []
    for size in sizes:
        piece: list[Part] = []
        while size > 0:
            if not parts:
                raise LayoutError(f"split sizes {list(sizes)} exceed the axis ({full_size(layout)})")
            head = parts.pop(0)
            if head.size <= size:
                piece.append(head)
                size -= head.size
            elif cut and size % head.unit == 0:
                piece.append(Part(size, head.unit))
                parts.insert(0, Part(head.size - size, head.unit))
                size = 0
            else:
                raise LayoutError(f"split sizes {list(sizes)} cut a component of size {head.size}")
        out.append(tuple(piece))
    return out
