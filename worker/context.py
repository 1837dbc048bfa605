"""The typed contract between the pipeline and a method's handler.

A handler is ``handler(model: LoadedModel, params: <its params model>, ctx: MethodContext) ->
Metrics``: it changes ``model`` in place and returns the step's metrics (JSON values). Everything
else it may use comes through ``ctx``, a :class:`MethodContext`; the pipeline's ``JobContext``
is one, a test's fake is another, so a handler runs in a unit test with no database, broker or
storage.

``JobContext`` reaches the database only through a :class:`JobPort` (recording progress, asking
whether the job was canceled, finding another model of the job's tenant): ``DbJobPort`` is the
real one (worker/pipeline.py); tests pass a fake.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NotRequired, Protocol, TypedDict

if TYPE_CHECKING:
    from core.config import Settings
    from worker.model_io import LoadedModel

# A step's metrics: JSON values (numbers, strings, lists, dicts), stored in the job's report.
Metrics = dict[str, object]


class Sample(TypedDict):
    """One row of a job's dataset."""

    text: str
    label: NotRequired[int | str]


class MethodContext(Protocol):
    """What a handler may use besides its model and parameters."""

    @property
    def settings(self) -> Settings: ...

    @property
    def work_dir(self) -> Path: ...

    def step_progress(self, note: str, fraction: float) -> None:
        """Progress inside the step, 0..1 (e.g. ``("step 40/200 loss 2.31", 0.2)``)."""
        ...

    def samples(self, which: str = "train") -> list[Sample]:
        """The job's dataset (``train``: ``dataset_id``; ``eval``: ``eval_dataset_id``)."""
        ...

    def cancel_requested(self) -> bool:
        """Whether the job's owner asked to cancel it (a long handler stops at its next check)."""
        ...

    def load_model(self, model_id: str) -> LoadedModel:
        """Another uploaded model of the job's tenant (e.g. a distillation student)."""
        ...


@dataclass(frozen=True)
class StoredModel:
    """Where another model of the job's tenant is stored."""

    format: str
    storage_prefix: str
    files: list[str]


class JobPort(Protocol):
    """The job's row, as the attempt running it may read and write it."""

    def record_progress(self, stage: str, fraction: float) -> bool | None:
        """Record progress (fenced on the attempt). False: the attempt lost the job; None: the
        database is unreachable (the job goes on)."""
        ...

    def cancel_requested(self) -> bool: ...

    def tenant_model(self, model_id: str) -> StoredModel | None:
        """A model of the job's tenant, or None when it is gone."""
        ...
