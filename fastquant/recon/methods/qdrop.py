"""QDrop (Wei et al., arXiv 2203.05740): block-wise reconstruction where each element of a
quantized activation (and of the block's input) is replaced by its float value with
probability 0.5 while training."""
from ..registry import ReconMethod, register_method

QDROP = register_method(ReconMethod(
    name="qdrop",
    summary="block units with QDrop (p = 0.5)",
    defaults={"qdrop_p": 0.5},
))
