"""BRECQ (Li et al., arXiv 2102.05426): block-wise reconstruction, AdaRound weights and LSQ
activation steps, the block's output MSE, no QDrop."""
from ..registry import ReconMethod, register_method

BRECQ = register_method(ReconMethod(
    name="brecq",
    summary="block units, AdaRound + LSQ, output MSE, no QDrop",
    defaults={"qdrop_p": 0.0},
))
