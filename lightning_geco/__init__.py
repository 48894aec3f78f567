"""lightning_geco: VAEs trained with GECO (Rezende & Viola, "Taming VAEs", 2018) on PyTorch Lightning."""

from lightning_geco.callbacks import GECOCallback, NonFiniteConstraintError
from lightning_geco.classifier import ImageClassifier
from lightning_geco.constraints import (
    ClassificationConstraint,
    Constraint,
    FeatureReconstruction,
    PatchNCC,
    ReconstructionBCE,
    ReconstructionMSE,
)
from lightning_geco.controllers import Algorithm1, MultiplierController, PIController
from lightning_geco.frozen import FrozenClassifier, FrozenNetwork, TorchvisionFeatures
from lightning_geco.geco import GECO, mse_to_psnr, psnr_to_mse
from lightning_geco.likelihoods import BernoulliLikelihood, GaussianLikelihood, Likelihood
from lightning_geco.metrics import AggregatePosteriorKL
from lightning_geco.models import ConvDRAW, ConvVAE, FlowVAE, LadderVAE, VAEModule, VAEOutput
from lightning_geco.objectives import ELBO, BetaVAE, CapacityBetaVAE, GECOObjective, KLWarmup, Objective, SigmaVAE
from lightning_geco.summary import RunSummary

__all__ = [
    "Algorithm1",
    "AggregatePosteriorKL",
    "BernoulliLikelihood",
    "BetaVAE",
    "CapacityBetaVAE",
    "ClassificationConstraint",
    "Constraint",
    "ConvDRAW",
    "ConvVAE",
    "ELBO",
    "FeatureReconstruction",
    "FlowVAE",
    "FrozenClassifier",
    "FrozenNetwork",
    "GECO",
    "GECOCallback",
    "GECOObjective",
    "GaussianLikelihood",
    "ImageClassifier",
    "KLWarmup",
    "LadderVAE",
    "Likelihood",
    "MultiplierController",
    "NonFiniteConstraintError",
    "Objective",
    "PIController",
    "PatchNCC",
    "ReconstructionBCE",
    "ReconstructionMSE",
    "RunSummary",
    "SigmaVAE",
    "TorchvisionFeatures",
    "VAEModule",
    "VAEOutput",
    "mse_to_psnr",
    "psnr_to_mse",
]
__version__ = "0.1.0"
