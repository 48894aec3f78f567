"""lightning_geco: VAEs trained with GECO (Rezende & Viola, "Taming VAEs", 2018) on PyTorch Lightning."""

from lightning_geco.batches import batch_images, batch_labels
from lightning_geco.callbacks import GECOCallback, NonFiniteConstraintError, ObjectiveNeverCalledError
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
from lightning_geco.diagnostics import DiagnosticPanels
from lightning_geco.frozen import FrozenClassifier, FrozenNetwork, TorchvisionFeatures
from lightning_geco.geco import GECO, MultiplierState, mse_to_psnr, psnr_to_mse
from lightning_geco.likelihoods import BernoulliLikelihood, GaussianLikelihood, Likelihood
from lightning_geco.metrics import AggregatePosteriorKL, LatentActivity, MeanWithStandardError
from lightning_geco.models import (
    ConvDRAW,
    ConvVAE,
    DiagonalGaussian,
    FlowVAE,
    LadderVAE,
    LatentPass,
    VAEModule,
    VAEOutput,
)
from lightning_geco.objectives import ELBO, BetaVAE, CapacityBetaVAE, GECOObjective, KLWarmup, Objective, SigmaVAE
from lightning_geco.rebuild import Rebuildable
from lightning_geco.resume import RandomState
from lightning_geco.schedules import CosineToFloor
from lightning_geco.summary import RunSummary
from lightning_geco.verdict import StallDetector, verdict_line

__all__ = [
    "AggregatePosteriorKL",
    "Algorithm1",
    "BernoulliLikelihood",
    "BetaVAE",
    "CapacityBetaVAE",
    "ClassificationConstraint",
    "Constraint",
    "ConvDRAW",
    "ConvVAE",
    "CosineToFloor",
    "DiagnosticPanels",
    "DiagonalGaussian",
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
    "LatentActivity",
    "LatentPass",
    "Likelihood",
    "MeanWithStandardError",
    "MultiplierController",
    "MultiplierState",
    "NonFiniteConstraintError",
    "ObjectiveNeverCalledError",
    "Objective",
    "PIController",
    "PatchNCC",
    "RandomState",
    "Rebuildable",
    "ReconstructionBCE",
    "ReconstructionMSE",
    "RunSummary",
    "SigmaVAE",
    "StallDetector",
    "TorchvisionFeatures",
    "VAEModule",
    "VAEOutput",
    "batch_images",
    "batch_labels",
    "mse_to_psnr",
    "psnr_to_mse",
    "verdict_line",
]
__version__ = "0.1.0"
