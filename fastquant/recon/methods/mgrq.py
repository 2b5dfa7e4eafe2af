"""MGRQ, Mixed Granularity Reconstruction Quantization (arXiv 2406.09229, ICIP 2024), as
fastquant reconstructs it from the paper's description (its code is not public).

Block-wise reconstruction with QDrop plus two more loss terms of ``fastquant.recon.losses``
at weight 1 each: Extra-Block Global Supervision (``global``: the KL divergence from the
float model's logits to those of the block's output run through the rest of the model) and
Intra-Block Local Supervision (``local``: every layer's output distribution inside the
block aligned with the float layer's). Their settings (``w_global``, ``w_local``,
``global_rest``, ``global_batch``, ``local_loss``) are ``ReconConfig`` fields.
"""
from ..registry import ReconMethod, register_method

MGRQ = register_method(ReconMethod(
    name="mgrq",
    summary="block units with QDrop plus MGRQ's global (logit KL) and local (per-layer distribution) terms",
    # lr_act 4e-5: the rate scaled with the steps cost MGRQ 6.4 points at W4A4 on the cpu
    # budget (72.75 -> 66.35 on dinov2-s14-fmnist), where it gained BRECQ 3.3 and QDrop 2.5
    defaults={"qdrop_p": 0.5, "w_global": 1.0, "w_local": 1.0, "lr_act": 4e-5},
    budgets={"cpu": {"global_batch": 8}},  # the global term on 8 images of each batch
))
