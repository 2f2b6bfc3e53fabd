"""awqkit: activation-aware weight quantization with optional greedy flip rounding.

``awqkit.quantize`` (a safetensors folder, streamed), ``awqkit.quantize_model`` (a model in
memory) and ``awqkit.QuantizeConfig``. The run's modules load on first use, so importing a light
module (``awqkit.config``) does not load the model and tensor code.
"""

__version__ = "0.1.0"

import os
from typing import Any

# torch's OpenMP (libgomp) keeps idle threads spinning for 300,000 iterations after each parallel
# region. The search runs thousands of small products, each a region: beside other CPU work the
# spinning threads hold the cores that work needs and a run took 4x longer (10x in the search);
# a short spin costs nothing measurable on an idle machine (README: CPU threads). libgomp reads it
# when torch loads, so it is set before the first torch import; the user's own value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__all__ = ["QuantizeConfig", "QuantizeResult", "quantize", "quantize_model", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "QuantizeConfig":
        from awqkit.config import QuantizeConfig

        return QuantizeConfig
    if name in ("QuantizeResult", "quantize", "quantize_model"):
        from awqkit import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'awqkit' has no attribute {name!r}")
