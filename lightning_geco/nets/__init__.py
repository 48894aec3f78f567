"""Encoder, decoder, flow and recurrent building blocks."""

from lightning_geco.nets.conv import ConvDecoder, ConvDownsampler, ConvEncoder, ConvUpsampler, conv_feature_sizes
from lightning_geco.nets.recurrent import ConvLSTMCell

__all__ = ["ConvDecoder", "ConvDownsampler", "ConvEncoder", "ConvLSTMCell", "ConvUpsampler", "conv_feature_sizes"]
