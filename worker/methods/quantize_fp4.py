"""``quantize.fp4``: the handler (core/methods/quantize_fp4.py has the method's parameters, checks
and description). The run is quantize.fp8's (worker/methods/quantize_fp8.py): llm-compressor's
preset through ``oneshot`` in memory, worker/stream/fp.py tensor by tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.methods.quantize_fp4 import DATA_FREE, QuantizeFP4Params
from worker.context import MethodContext, Metrics
from worker.methods import handler

if TYPE_CHECKING:
    from worker.model_io import LoadedModel


def _stream(params: QuantizeFP4Params, ctx: Any) -> Any:
    from worker.methods.quantize_fp8 import scheme_metrics
    from worker.stream import NotStreamable
    from worker.stream.fp import FloatQuantStep

    if params.scheme not in DATA_FREE:
        raise NotStreamable(f"quantize.fp4 scheme {params.scheme} calibrates on data: the model is built in memory")
    return FloatQuantStep(
        "quantize.fp4", params.scheme, params.ignore, lambda: scheme_metrics(params.scheme, params.ignore)
    )


@handler("quantize.fp4", stream=_stream)
def quantize_fp4(model: LoadedModel, params: QuantizeFP4Params, ctx: MethodContext) -> Metrics:
    """FP4 (e2m1) weights in microscaled groups: NVFP4 or MXFP4, 16-bit or FP4 activations (vLLM)."""
    from worker.methods.quantize_fp8 import run_in_memory

    return run_in_memory(model, params, ctx, "quantize.fp4", calibrate=params.scheme not in DATA_FREE)
