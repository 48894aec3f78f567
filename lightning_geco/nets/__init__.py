"""Encoder and decoder building blocks."""

from lightning_geco.nets.conv import ConvDecoder, ConvEncoder, conv_feature_sizes

__all__ = ["ConvDecoder", "ConvEncoder", "conv_feature_sizes"]
