"""awqkit: activation-aware weight quantization with optional greedy flip rounding."""

__version__ = "0.1.0"

from awqkit.config import QuantizeConfig  # noqa: E402
from awqkit.pipeline import QuantizeResult, quantize, quantize_model  # noqa: E402

__all__ = ["QuantizeConfig", "QuantizeResult", "quantize", "quantize_model", "__version__"]
