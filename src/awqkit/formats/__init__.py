"""How a quantized model is stored: fake (float), AutoAWQ GEMM, compressed-tensors, GGUF.

``grids`` says which grids each format holds (imported by the config, so it stays light),
``tensors`` turns a block's integers into a format's tensors, ``folder`` writes the whole folder.
"""
