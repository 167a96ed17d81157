"""Linear methods (dense, int8, int4, fp8, GGUF packed) and the quantization config.

``base.LinearMethod`` is the seam; ``get_linear_method`` picks a layer's method. Submodules are
imported lazily so that ``fuselm.config`` can read ``config.QuantizationConfig`` without torch
layers.
"""
