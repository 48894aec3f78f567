"""ConvDRAW (Gregor et al. 2016, "Towards conceptual compression").

A recurrent VAE that draws an image on a canvas over T steps. At step t:

- the *reader* (stride-2 convolutions) sees ``[x, x - mean(canvas)]``, the image and what is still
  missing, at the latent resolution (h, w) = (H, W) / 2^L;
- the encoder ConvLSTM reads that and the decoder's previous state, and gives the posterior
  ``q(z_t | x, z_<t)``; the prior ``p(z_t | z_<t)`` comes from the decoder's previous state alone;
- the decoder ConvLSTM takes z_t, and the *writer* (transposed convolutions) adds its output to
  the canvas. The final canvas is the decoder output the likelihood reads.

Each z_t is a (latent_channels, h, w) Gaussian. The rate is ``sum_t KL(q_t || p_t)``, each
closed form at the sampled history, logged per step as ``<stage>/rate/step_<t>``.

The aggregate-posterior metrics read every step's posterior whitened by its prior
(:meth:`~lightning_geco.models.base.DiagonalGaussian.whitened`): per image their KL to
N(0, I) is exactly the rate. Single coordinates of a spatial code carry no meaning on their
own, so there is no traversal panel.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from functools import reduce
from typing import Any

import torch
from torch import Tensor, nn

from lightning_geco.checks import is_positive_int
from lightning_geco.models.base import DiagonalGaussian, LatentPass, VAEModule, gaussian_kl
from lightning_geco.nets import ConvDownsampler, ConvLSTMCell, ConvUpsampler
from lightning_geco.nets.conv import check_image_shape

__all__ = ["ConvDRAW"]


class ConvDRAW(VAEModule):
    """Convolutional DRAW with T steps of spatial Gaussian latents and a learned prior.

    Args:
        num_steps: T, the drawing steps.
        latent_channels: channels of each step's latent map.
        hidden_channels: channels of the encoder and decoder ConvLSTM states.
        widths: channels of each stride-2 level of the reader (mirrored by the writer); the
            latent maps are ``(H, W) / 2^len(widths)``.
        kwargs: the base's (objective, likelihood, learning_rate, ...), see
            :class:`~lightning_geco.models.base.VAEModule` (its ``latent_dim`` is the
            total number of latent coordinates, ``T * latent_channels * h * w``).
    """

    architecture_keys = ("image_shape", "num_steps", "latent_channels", "hidden_channels", "widths")

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 64, 64),
        num_steps: int = 4,
        latent_channels: int = 4,
        hidden_channels: int = 64,
        widths: Sequence[int] = (32, 64, 64, 64),
        **kwargs: Any,
    ) -> None:
        if "latent_dim" in kwargs:
            raise ValueError(
                f"ConvDRAW derives its latent_dim (num_steps x latent_channels x the reader's output size), got "
                f"latent_dim={kwargs['latent_dim']!r}: set num_steps and latent_channels instead."
            )
        counts = (num_steps, latent_channels, hidden_channels)
        if not all(is_positive_int(n) for n in counts):
            raise ValueError(
                "ConvDRAW num_steps, latent_channels and hidden_channels must be positive ints, got "
                f"{num_steps!r}, {latent_channels!r}, {hidden_channels!r}."
            )
        channels, height, width = check_image_shape(image_shape)
        reader = ConvDownsampler(2 * channels, height, width, widths)
        latent_height, latent_width = reader.sizes[-1]
        super().__init__(
            image_shape=image_shape,
            latent_dim=num_steps * latent_channels * latent_height * latent_width,
            **kwargs,
        )
        self.save_hyperparameters(ignore=["objective", "likelihood"])
        self.num_steps = num_steps
        self.latent_shape = (latent_channels, latent_height, latent_width)
        self.reader = reader
        self.encoder_cell = ConvLSTMCell(widths[-1] + hidden_channels, hidden_channels)
        self.decoder_cell = ConvLSTMCell(latent_channels, hidden_channels)
        self.posterior_head = nn.Conv2d(hidden_channels, 2 * latent_channels, 3, padding=1)
        self.prior_head = nn.Conv2d(hidden_channels, 2 * latent_channels, 3, padding=1)
        self.write_head = nn.Sequential(nn.Conv2d(hidden_channels, widths[-1], 3, padding=1), nn.SiLU())
        self.writer = ConvUpsampler(channels, height, width, widths)

    def draw(
        self, x: Tensor | None, batch_size: int, sample: bool = True
    ) -> tuple[list[tuple[DiagonalGaussian | None, DiagonalGaussian, Tensor]], Tensor]:
        """Runs the T steps. Returns ``[(posterior or None, prior, z_t)] * T`` and the final canvas.

        With images ``x`` each z_t comes from the posterior, without them from the prior;
        ``sample=False`` takes the distribution's mean instead of a draw.
        """
        h, w = self.latent_shape[1:]
        like = self.prior_head.weight
        decoder_state = self.decoder_cell.initial_state(batch_size, h, w, like)
        encoder_state = self.encoder_cell.initial_state(batch_size, h, w, like)
        canvas = like.new_zeros(batch_size, *self.image_shape)
        steps = []
        for _ in range(self.num_steps):
            prior = DiagonalGaussian(*self.prior_head(decoder_state[0]).chunk(2, dim=1))
            posterior = None
            if x is not None:
                error = x - self.likelihood.mean(canvas)
                features = self.reader(torch.cat([x, error], dim=1))
                encoder_state = self.encoder_cell(torch.cat([features, decoder_state[0]], dim=1), encoder_state)
                posterior = DiagonalGaussian(*self.posterior_head(encoder_state[0]).chunk(2, dim=1))
            source = posterior if posterior is not None else prior
            z = source.rsample() if sample else source.mean
            decoder_state = self.decoder_cell(z, decoder_state)
            canvas = canvas + self.writer(self.write_head(decoder_state[0]))
            steps.append((posterior, prior, z))
        return steps, canvas

    def infer(self, x: Tensor) -> LatentPass:
        drawn, canvas = self.draw(x, x.shape[0])
        steps = [(q, p, z) for q, p, z in drawn if q is not None]
        assert len(steps) == len(drawn), "draw(x) gives every step a posterior"
        rates = {f"step_{t + 1}": gaussian_kl(q, p) for t, (q, p, _) in enumerate(steps)}
        log_weight = reduce(operator.add, (p.log_density(z) - q.log_density(z) for q, p, z in steps))
        return LatentPass(
            decoder_output=canvas,
            rate=reduce(operator.add, rates.values()),
            log_weight=log_weight,
            posterior=DiagonalGaussian.concatenate([q.whitened(p) for q, p, _ in steps]),
            z=torch.stack([z for _, _, z in steps], dim=1),
            rate_terms=rates,
        )

    @torch.no_grad()
    def decode_posterior_code(self, x: Tensor) -> Tensor:
        return self.draw(x, x.shape[0], sample=False)[1]

    @torch.no_grad()
    def generate(self, num_samples: int) -> Tensor:
        return self.draw(None, num_samples)[1]

    def latent_traversal(self, x: Tensor, dims: Sequence[int], steps: int = 9, span: float = 2.5) -> None:
        return None
