"""A stage is a small class over a generator; runners (local, Ray, Beam) only schedule it.

Every sample that enters a stage leaves it exactly once (DESIGN.md section 2):
``process`` yields a row dict (written), a :class:`Drop` (dropped with a
machine-readable reason) or a :class:`Fail` (failed with an error class and a
message). The runner counts them per partition, so counts always add up.

Batch interface: ``process`` may also yield a ``pyarrow.Table`` or
``RecordBatch`` whose columns follow ``output_schema``: every row of it is
written, in order, without becoming a Python object. Row-level stages that only
add or select columns (tokenize, build's row selection) use it so image
columns stay Arrow buffers end to end; rows they drop or fail are still
reported one :class:`Drop` / :class:`Fail` each.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from schemas.sample import sanitize_id_part


@dataclass(frozen=True, slots=True)
class Partition:
    """One unit of work (an input file, a log, an input shard). ``id`` names its output files."""

    id: str
    payload: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.id != sanitize_id_part(self.id):
            raise ValueError(f"partition id {self.id!r} is not a safe file name component")


@dataclass(frozen=True, slots=True)
class Drop:
    """A sample dropped on purpose; ``reason`` is a short machine-readable key."""

    sample_id: str
    reason: str
    file: str | None = None


@dataclass(frozen=True, slots=True)
class Fail:
    """A sample (or a whole input, with ``sample_id=None``) that failed; counted by ``error_class``."""

    sample_id: str | None
    error_class: str
    message: str
    file: str | None = None


@dataclass(frozen=True, slots=True)
class Note:
    """A count about the data that is not a sample's outcome (e.g. objects kept without a velocity).

    The runner sums ``n`` per ``key`` into the run summary's ``noted`` counters;
    a note is not a sample, so it never enters ``seen``.
    """

    key: str
    n: int = 1


Outcome = dict[str, Any] | Drop | Fail | Note | pa.Table | pa.RecordBatch
ARROW_BATCH = (pa.Table, pa.RecordBatch)  # isinstance check for a batch of written rows


class Stage(ABC):
    """Base class of every pipeline stage.

    Subclasses set ``name`` and ``output_schema``, list their work in
    :meth:`partitions` and turn one partition into outcomes in :meth:`process`.
    ``setup``/``teardown`` bracket the partitions a worker runs (for resources
    such as an HTTP client). A stage instance is shipped to workers by
    pickling, so it holds configuration only; resources are made in ``setup``.
    """

    name: ClassVar[str] = "stage"
    output_schema: pa.Schema
    # Rows per output shard and per Parquet row group when the stage knows better than the defaults
    # (which suit rows holding camera frames); a stage of tiny rows writes one large group instead.
    shard_rows: ClassVar[int | None] = None
    row_group_rows: ClassVar[int | None] = None

    @abstractmethod
    def partitions(self) -> list[Partition]:
        """The work units, in a deterministic order."""

    @abstractmethod
    def process(self, partition: Partition) -> Iterator[Outcome]:
        """Yield one outcome per sample of ``partition`` (or Arrow batches of written rows, see above)."""

    def setup(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Create per-worker resources (called once per worker before any partition)."""

    def teardown(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release what :meth:`setup` made."""

    def config_dict(self) -> dict[str, Any]:
        """The settings that determine this stage's output (recorded in markers and the manifest)."""
        return {}

    def fingerprint(self) -> str:
        """Hash of :meth:`config_dict`: a rerun with a different config must not mix outputs."""
        blob = json.dumps({"stage": self.name, "config": self.config_dict()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
