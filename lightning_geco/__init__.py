"""lightning_geco: VAEs trained with GECO (Rezende & Viola, "Taming VAEs", 2018) on PyTorch Lightning."""

from lightning_geco.callbacks import GECOCallback, NonFiniteConstraintError
from lightning_geco.constraints import Constraint, ReconstructionMSE
from lightning_geco.geco import GECO, mse_to_psnr, psnr_to_mse
from lightning_geco.likelihoods import BernoulliLikelihood, GaussianLikelihood, Likelihood
from lightning_geco.metrics import AggregatePosteriorKL
from lightning_geco.models import ConvVAE, VAEModule, VAEOutput
from lightning_geco.objectives import ELBO, BetaVAE, GECOObjective, Objective
from lightning_geco.summary import RunSummary

__all__ = [
    "AggregatePosteriorKL",
    "BernoulliLikelihood",
    "BetaVAE",
    "Constraint",
    "ConvVAE",
    "ELBO",
    "GECO",
    "GECOCallback",
    "GECOObjective",
    "GaussianLikelihood",
    "Likelihood",
    "NonFiniteConstraintError",
    "Objective",
    "ReconstructionMSE",
    "RunSummary",
    "VAEModule",
    "VAEOutput",
    "mse_to_psnr",
    "psnr_to_mse",
]
__version__ = "0.1.0"
