"""Conditional affine coupling layers (Dinh et al. 2017, "Density estimation using Real NVP").

Each layer keeps half of z (a fixed binary mask) and moves the other half by a scale and shift
computed from the kept half and a context vector (the encoder's features of x):
``z' = m * z + (1 - m) * (z * exp(s) + t)``, ``log |det dz'/dz| = sum((1 - m) * s)``.
Consecutive layers swap the halves. The scale goes through ``tanh`` so one layer can never
scale by more than e^{+-1}; the last linear layer starts at zero, so a fresh flow is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_geco.checks import is_positive_int

__all__ = ["AffineCoupling", "CouplingFlow"]


class AffineCoupling(nn.Module):
    """One coupling layer on (N, dim) codes given a (N, context_dim) context.

    Args:
        mask: (dim,) of 0/1; the ones are kept, the zeros are transformed.
    """

    mask: Tensor  # buffer

    def __init__(self, mask: Tensor, context_dim: int, hidden_dim: int = 128) -> None:
        super().__init__()
        dim = mask.numel()
        self.register_buffer("mask", mask.float())
        self.net = nn.Sequential(
            nn.Linear(dim + context_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, 2 * dim),
        )
        # Start at the identity (zero scale and shift).
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(z', log |det dz'/dz|)`` of shapes (N, dim) and (N,)."""
        kept = z * self.mask
        log_scale, shift = self.net(torch.cat([kept, context], dim=1)).chunk(2, dim=1)
        moved = 1.0 - self.mask
        log_scale = torch.tanh(log_scale) * moved
        out = kept + moved * (z * torch.exp(log_scale) + shift)
        return out, log_scale.sum(dim=1)


class CouplingFlow(nn.Module):
    """``depth`` coupling layers with alternating masks: z_0 -> z_K and ``sum_k log |det|``.

    Args:
        dim: size of z (at least 2, so each half is non-empty).
        context_dim: size of the conditioning vector.
        depth: number of coupling layers.
        hidden_dim: width of each layer's network.
    """

    def __init__(self, dim: int, context_dim: int, depth: int = 4, hidden_dim: int = 128) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"A coupling flow needs a code of at least 2 dimensions, got latent_dim={dim}.")
        if not is_positive_int(depth):
            raise ValueError(f"flow depth must be a positive int (flow_depth: coupling layers), got {depth!r}.")
        if not is_positive_int(hidden_dim):
            # 0 built conditioners with no hidden layer: each coupling an affine map ignoring its input.
            raise ValueError(f"flow hidden_dim must be a positive int (flow_hidden_dim: each coupling network's width), got {hidden_dim!r}.")
        even = (torch.arange(dim) % 2 == 0).float()
        self.layers = nn.ModuleList(
            AffineCoupling(even if k % 2 == 0 else 1.0 - even, context_dim, hidden_dim) for k in range(depth)
        )

    def forward(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        log_det = torch.zeros(z.shape[0], device=z.device, dtype=torch.float32)
        for layer in self.layers:
            z, layer_log_det = layer(z, context)
            log_det = log_det + layer_log_det.float()
        return z, log_det
