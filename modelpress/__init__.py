"""modelpress: the Python SDK of the modelpress compression service.

    from modelpress import Client

    with Client("http://127.0.0.1:8000", api_key="mp_...") as mp:   # or $MODELPRESS_URL / $MODELPRESS_API_KEY
        model = mp.upload_model("gpt2/", on_progress=lambda sent, total: ...)   # resumable (tus)
        job = mp.submit(model.id, [("prune.magnitude", {"sparsity": 0.5}), ("quantize.cast", {"dtype": "bfloat16"})])
        job = mp.wait(job.id, on_progress=lambda j: print(j.progress.stage, j.progress.fraction))
        mp.download(job.id, "out/")          # out/model.zip, resumable, sha256-verified
        print(mp.report(job.id).size["compression_ratio"])

``AsyncClient`` has the same methods as coroutines. Results are pydantic models (``Model``,
``Dataset``, ``Job``, ``Report``, ``Sweep``, ...); errors are typed (``NotFound``, ``Conflict``,
``Unprocessable``, ``JobFailed``, ``TransportError``, ...: the tree is in ``modelpress._errors``).
Uploads are resumable (``/v1/uploads``, tus 1.0): ``plan_upload(path, include=, exclude=)`` says
what an upload sends and what it skips, and why; an interrupted ``upload_model`` called again
sends only the bytes the server does not have (``modelpress._upload`` describes the state file).
Importing this package loads httpx and pydantic only: no torch and none of the server's code; and
only when a name is first used (PEP 562), so ``modelpress --help`` and shell completion, which
import ``modelpress._cli``, start without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelpress._client import (
        DEFAULT_URL,
        AsyncClient,
        Client,
        normalize_steps,
    )
    from modelpress._errors import (
        APIError,
        BadRequest,
        ChecksumMismatch,
        Conflict,
        Forbidden,
        Gone,
        ImportFailed,
        ImportTimeout,
        JobCanceled,
        JobError,
        JobFailed,
        ModelImportError,
        ModelpressError,
        NotFound,
        PayloadTooLarge,
        RangeNotSatisfiable,
        RateLimited,
        ServiceUnavailable,
        TransportError,
        Unauthorized,
        Unprocessable,
        UnsupportedMediaType,
        WaitTimeout,
    )
    from modelpress._models import (
        ApiKey,
        Artifact,
        Counts,
        CreatedApiKey,
        Dataset,
        Download,
        ErrorInfo,
        Estimate,
        FleetBudget,
        ImportProgress,
        Job,
        Link,
        Method,
        MethodConstraint,
        Model,
        ModelFile,
        Page,
        Plan,
        PointMetrics,
        Progress,
        Recipe,
        Report,
        Step,
        Sweep,
        SweepPoint,
        SweepSpec,
        SweepSummary,
        Worker,
    )
    from modelpress._upload import (
        DEFAULT_CHUNK_SIZE,
        PlannedFile,
        SkippedFile,
        UploadPlan,
        plan_upload,
    )
    from modelpress._version import (
        __version__,
    )

# Where each public name lives: imported by __getattr__ on first use.
_WHERE = {
    "DEFAULT_URL": "modelpress._client",
    "AsyncClient": "modelpress._client",
    "Client": "modelpress._client",
    "normalize_steps": "modelpress._client",
    "APIError": "modelpress._errors",
    "BadRequest": "modelpress._errors",
    "ChecksumMismatch": "modelpress._errors",
    "Conflict": "modelpress._errors",
    "Forbidden": "modelpress._errors",
    "Gone": "modelpress._errors",
    "ImportFailed": "modelpress._errors",
    "ImportTimeout": "modelpress._errors",
    "JobCanceled": "modelpress._errors",
    "JobError": "modelpress._errors",
    "JobFailed": "modelpress._errors",
    "ModelImportError": "modelpress._errors",
    "ModelpressError": "modelpress._errors",
    "NotFound": "modelpress._errors",
    "PayloadTooLarge": "modelpress._errors",
    "RangeNotSatisfiable": "modelpress._errors",
    "RateLimited": "modelpress._errors",
    "ServiceUnavailable": "modelpress._errors",
    "TransportError": "modelpress._errors",
    "Unauthorized": "modelpress._errors",
    "Unprocessable": "modelpress._errors",
    "UnsupportedMediaType": "modelpress._errors",
    "WaitTimeout": "modelpress._errors",
    "ApiKey": "modelpress._models",
    "Artifact": "modelpress._models",
    "Counts": "modelpress._models",
    "CreatedApiKey": "modelpress._models",
    "Dataset": "modelpress._models",
    "Download": "modelpress._models",
    "ErrorInfo": "modelpress._models",
    "Estimate": "modelpress._models",
    "FleetBudget": "modelpress._models",
    "ImportProgress": "modelpress._models",
    "Job": "modelpress._models",
    "Link": "modelpress._models",
    "Method": "modelpress._models",
    "MethodConstraint": "modelpress._models",
    "Model": "modelpress._models",
    "ModelFile": "modelpress._models",
    "Page": "modelpress._models",
    "Plan": "modelpress._models",
    "PointMetrics": "modelpress._models",
    "Progress": "modelpress._models",
    "Recipe": "modelpress._models",
    "Report": "modelpress._models",
    "Step": "modelpress._models",
    "Sweep": "modelpress._models",
    "SweepPoint": "modelpress._models",
    "SweepSpec": "modelpress._models",
    "SweepSummary": "modelpress._models",
    "Worker": "modelpress._models",
    "DEFAULT_CHUNK_SIZE": "modelpress._upload",
    "PlannedFile": "modelpress._upload",
    "SkippedFile": "modelpress._upload",
    "UploadPlan": "modelpress._upload",
    "plan_upload": "modelpress._upload",
    "__version__": "modelpress._version",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'modelpress' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # the next access is a plain global
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_URL",
    "APIError",
    "ApiKey",
    "Artifact",
    "AsyncClient",
    "BadRequest",
    "ChecksumMismatch",
    "Client",
    "Conflict",
    "Counts",
    "CreatedApiKey",
    "Dataset",
    "Download",
    "ErrorInfo",
    "Estimate",
    "FleetBudget",
    "Forbidden",
    "Gone",
    "ImportFailed",
    "ImportProgress",
    "ImportTimeout",
    "Job",
    "JobCanceled",
    "JobError",
    "JobFailed",
    "Link",
    "Method",
    "MethodConstraint",
    "Model",
    "ModelFile",
    "ModelImportError",
    "ModelpressError",
    "NotFound",
    "Page",
    "Plan",
    "PayloadTooLarge",
    "PlannedFile",
    "PointMetrics",
    "Progress",
    "Recipe",
    "RangeNotSatisfiable",
    "RateLimited",
    "Report",
    "ServiceUnavailable",
    "SkippedFile",
    "Step",
    "Sweep",
    "SweepPoint",
    "SweepSpec",
    "SweepSummary",
    "TransportError",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
    "UploadPlan",
    "WaitTimeout",
    "Worker",
    "__version__",
    "normalize_steps",
    "plan_upload",
]
