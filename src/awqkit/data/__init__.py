"""Text for calibration and evaluation: corpora by name or path, and token windows cut from them."""
