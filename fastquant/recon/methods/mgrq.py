"""MGRQ, Mixed Granularity Reconstruction Quantization (arXiv 2406.09229, ICIP 2024), as
fastquant reconstructs it from the paper's description (its code is not public).

Block-wise reconstruction with QDrop plus two more loss terms of ``fastquant.recon.losses``:
Extra-Block Global Supervision (``global``: the KL divergence from the float model's logits
to those of the block's output run through the rest of the model) and Intra-Block Local
Supervision (``local``: every layer's output distribution inside the block aligned with the
float layer's). The paper weighs them 1 each; here each is weighed 0.1 of the block's own
reconstruction loss (each term normalised by its first value), because at the ``cpu``
budget the terms at 1 pulled every block away from its float output (W4A4 dinov2-s14-fmnist:
55.95 at 1 with ``lr_act`` 4e-5, 71.35 at 0.1 with the scaled ``lr_act``). Their settings
(``w_global``, ``w_local``, ``global_rest``, ``global_batch``, ``local_loss``) are
``ReconConfig`` fields.
"""
from ..registry import ReconMethod, register_method

MGRQ = register_method(ReconMethod(
    name="mgrq",
    summary="block units with QDrop plus MGRQ's global (logit KL) and local (per-layer distribution) terms",
    # measured on dinov2-s14-fmnist W4A4 at the cpu budget (docs/methods.md, item 12): the
    # paper's weights 1 and lr_act 4e-5 gave 55.95, the terms at 0.1 with the activation
    # steps' rate scaled with the steps (lr_act=None, as the other methods) 71.35
    defaults={"qdrop_p": 0.5, "w_global": 0.1, "w_local": 0.1},
    budgets={"cpu": {"global_batch": 8}},  # the global term on 8 images of each batch
))
