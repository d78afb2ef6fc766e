"""Tensor declarations: the name, V2 datatype and dims a model accepts or returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import _core

# V2 datatype -> NumPy dtype name (BYTES travel as object arrays of ``bytes``), from the core's one
# datatype table.
NUMPY_DTYPES: dict[str, str] = dict(_core.datatypes())
DATATYPES = tuple(NUMPY_DTYPES)


@dataclass(frozen=True)
class Tensor:
    """A model input or output. ``dims`` exclude the batch dimension; -1 marks a variable dim."""

    name: str
    datatype: str
    dims: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("tensor name must not be empty")
        if self.datatype not in DATATYPES:
            raise ValueError(f"tensor '{self.name}': unknown datatype '{self.datatype}' (use one of {DATATYPES})")
        if any(not isinstance(d, int) or d < -1 for d in self.dims):
            raise ValueError(f"tensor '{self.name}': dims {self.dims} must be integers >= -1")

    def as_tuple(self) -> tuple[str, str, list[int]]:
        return (self.name, self.datatype, list(self.dims))
