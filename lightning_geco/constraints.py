"""GECO constraints: what the user asks of a model, in data units.

A constraint reads one number per example (its *reading*, e.g. the per-element MSE of the
reconstruction), compares it to a tolerance the user stated in the same data units, and
returns a per-example *value* that is <= 0 when the example meets the tolerance. Values are
per element, so one GECO step size fits every resolution; ``num_elements`` turns them into
per-image units for the Lagrangian (``lambda * num_elements * value``, next to a rate in
nats per image).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from torch import Tensor, nn

from lightning_geco.geco import mse_to_psnr, psnr_to_mse

if TYPE_CHECKING:
    from lightning_geco.models.base import VAEOutput

__all__ = ["Constraint", "ReconstructionMSE"]

# Above ~100 dB the MSE (1e-10) is below what fp32 images in [0, 1] can resolve.
MAX_PSNR_DB = 100.0


class Constraint(nn.Module):
    """Interface of a GECO constraint.

    Subclasses set ``name`` and ``unit`` and implement :meth:`reading`, :meth:`forward`.
    """

    name: str
    unit: str
    tolerance: float
    #: the metric the validation loop logs this constraint's reading under (``val/<reading_name>``)
    reading_name: str

    @property
    def reading_tolerance(self) -> float:
        """The tolerance in the reading's units (what a chart of the reading draws as its line)."""
        return self.tolerance

    def satisfied_by(self, reading: float) -> bool:
        """Whether a reading (e.g. a validation average) meets the tolerance."""
        raise NotImplementedError

    def reading(self, output: VAEOutput) -> Tensor:
        """The raw per-example quantity the tolerance is stated on, shape (N,)."""
        raise NotImplementedError

    def forward(self, output: VAEOutput) -> Tensor:
        """Per-example constraint value, shape (N,), per element; <= 0 is feasible."""
        raise NotImplementedError

    def num_elements(self, output: VAEOutput) -> int:
        """Elements per example: the factor from per-element to per-image units."""
        return output.x[0].numel()

    def describe(self) -> dict[str, float | str]:
        """The constraint as stated by the user, for checkpoints and summaries."""
        return {"name": self.name, "tolerance": self.tolerance, "unit": self.unit}


class ReconstructionMSE(Constraint):
    """Per-element mean squared error of the reconstruction at most a tolerance.

    Args:
        tolerance: in ``unit``: an MSE in (0, 1] (data lie in [0, 1]) or a PSNR in dB in
            (0, 100] (peak 1: PSNR 20 dB is MSE 0.01).
        unit: ``"mse"`` or ``"psnr"``.
        name: the constraint's name in logs (``geco/<name>/...`` when there are several).
    """

    def __init__(
        self,
        tolerance: float = 0.01,
        unit: Literal["mse", "psnr"] = "mse",
        name: str = "reconstruction",
    ) -> None:
        super().__init__()
        if unit == "mse":
            if not (0.0 < tolerance <= 1.0) or math.isnan(tolerance):
                raise ValueError(
                    f"ReconstructionMSE tolerance {tolerance!r} (unit 'mse') cannot be expressed: "
                    "a per-element MSE of images in [0, 1] must lie in (0, 1]."
                )
            self.tolerance_mse = float(tolerance)
        elif unit == "psnr":
            if not (0.0 < tolerance <= MAX_PSNR_DB) or math.isnan(tolerance):
                raise ValueError(
                    f"ReconstructionMSE tolerance {tolerance!r} (unit 'psnr') is out of range: "
                    f"a PSNR in dB for images in [0, 1] must lie in (0, {MAX_PSNR_DB:g}]."
                )
            self.tolerance_mse = psnr_to_mse(tolerance)
        else:
            raise ValueError(f"ReconstructionMSE unit must be 'mse' or 'psnr', got {unit!r}.")
        self.tolerance = float(tolerance)
        self.unit = unit
        self.name = name

    reading_name = "distortion"

    @property
    def reading_tolerance(self) -> float:
        return self.tolerance_mse

    def satisfied_by(self, reading: float) -> bool:
        return reading <= self.tolerance_mse

    @property
    def tolerance_psnr(self) -> float:
        return mse_to_psnr(self.tolerance_mse)

    def reading(self, output: VAEOutput) -> Tensor:
        return output.distortion

    def forward(self, output: VAEOutput) -> Tensor:
        return output.distortion - self.tolerance_mse
