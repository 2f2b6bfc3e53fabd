"""awqkit: activation-aware weight quantization with optional greedy flip rounding."""

__version__ = "0.1.0"

import os

# torch's OpenMP (libgomp) keeps idle threads spinning for 300,000 iterations after each parallel
# region. The search runs thousands of small products, each a region: beside other CPU work the
# spinning threads hold the cores that work needs and a run took 4x longer (10x in the search);
# a short spin costs nothing measurable on an idle machine (README: CPU threads). libgomp reads it
# when torch loads, so it is set before the first torch import; the user's own value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from awqkit.config import QuantizeConfig  # noqa: E402
from awqkit.pipeline import QuantizeResult, quantize, quantize_model  # noqa: E402

__all__ = ["QuantizeConfig", "QuantizeResult", "quantize", "quantize_model", "__version__"]
