"""A linear probe on a ViT backbone: logits from [class token, mean of patch tokens]."""
from __future__ import annotations

import torch
from torch import nn


def probe_features(tokens: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """[B, N, C] normalised tokens -> [B, 2C] features (class token, mean patch token)."""
    return torch.cat([tokens[:, 0], tokens[:, num_prefix_tokens:].mean(dim=1)], dim=-1)


class LinearProbe(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(2 * backbone.embed_dim, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reparam_groups(self):
        """(fastquant.adapters' protocol) The head's input is [class token, mean patch token]
        of the final LayerNorm's output: both halves are per-channel linear in it, so
        per-channel input scales of the head can be folded into that LayerNorm (channel j
        comes from j mod C)."""
        norm = self.backbone.norm
        if not isinstance(norm, nn.LayerNorm):
            return []
        c = self.backbone.embed_dim
        return [(norm, self.head, torch.arange(2 * c) % c)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)
        return probe_features(tokens, self.backbone.num_prefix_tokens)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from the backbone's normalised tokens (timm's ``forward_head``, and
        fastquant.adapters' protocol)."""
        return self.head(probe_features(tokens, self.backbone.num_prefix_tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
