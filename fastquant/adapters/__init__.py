"""Adapters: everything that knows timm's Vision Transformer structure (``vit``)."""
from .vit import (Unit, classifier_of, depth_of, embed, expected_input, find_vit, half_modules, half_name,
                  has_attention, layernorm_consumers, mlp_output_linears, patch_embed_convs, rest_modules, run_head,
                  run_rest, run_span,
                  run_unit, span_unit, splittable, unit_by_name, unit_modules, unit_name)

__all__ = ["Unit", "classifier_of", "depth_of", "embed", "expected_input", "find_vit", "half_modules", "half_name",
           "has_attention", "layernorm_consumers", "mlp_output_linears", "patch_embed_convs", "rest_modules", "run_head", "run_rest",
           "run_span", "run_unit", "span_unit", "splittable", "unit_by_name", "unit_modules", "unit_name"]
