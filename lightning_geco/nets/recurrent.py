"""Convolutional LSTM cell (Shi et al. 2015): an LSTM whose gates are 2-d convolutions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConvLSTMCell"]


class ConvLSTMCell(nn.Module):
    """One step: input (N, in_channels, h, w) and state (hidden, cell), each (N, hidden_channels, h, w).

    Args:
        kernel_size: odd size of the gates' convolution (padding keeps h, w).
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ConvLSTMCell kernel_size must be odd (same-size padding), got {kernel_size}.")
        self.hidden_channels = hidden_channels
        self.gates = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2)

    def initial_state(self, batch_size: int, height: int, width: int, like: Tensor) -> tuple[Tensor, Tensor]:
        zeros = like.new_zeros(batch_size, self.hidden_channels, height, width)
        return zeros, zeros

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        hidden, cell = state
        i, f, o, g = self.gates(torch.cat([x, hidden], dim=1)).chunk(4, dim=1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        hidden = torch.sigmoid(o) * torch.tanh(cell)
        return hidden, cell
