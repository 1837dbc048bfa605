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
Importing this package loads httpx and pydantic only: no torch and none of the server's code.
"""

from modelpress._client import DEFAULT_URL, AsyncClient, Client, normalize_steps
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
    Model,
    ModelFile,
    Page,
    Plan,
    PointMetrics,
    Progress,
    Report,
    Step,
    Sweep,
    SweepPoint,
    SweepSpec,
    SweepSummary,
    Worker,
)
from modelpress._upload import DEFAULT_CHUNK_SIZE, PlannedFile, SkippedFile, UploadPlan, plan_upload
from modelpress._version import __version__

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
