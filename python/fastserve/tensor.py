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
    """A model input or output. ``dims`` exclude the batch dimension; -1 marks a variable dim.
    ``reshape`` (Triton's) is the shape the model itself takes or gives while clients see
    ``dims``; an ``optional`` input may be left out of a request."""

    name: str
    datatype: str
    dims: list[int] = field(default_factory=list)
    reshape: list[int] | None = None
    optional: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("tensor name must not be empty")
        if self.datatype not in DATATYPES:
            raise ValueError(f"tensor '{self.name}': unknown datatype '{self.datatype}' (use one of {DATATYPES})")
        for key, dims in (("dims", self.dims), ("reshape", self.reshape or [])):
            if any(not isinstance(d, int) or d < -1 for d in dims):
                raise ValueError(f"tensor '{self.name}': {key} {dims} must be integers >= -1")

    @property
    def model_dims(self) -> list[int]:
        """The dims the model itself has: ``reshape`` when set."""
        return list(self.reshape if self.reshape is not None else self.dims)

    def as_tuple(self) -> tuple[str, str, list[int], list[int] | None, bool]:
        reshape = None if self.reshape is None else list(self.reshape)
        return (self.name, self.datatype, list(self.dims), reshape, self.optional)
