"""GECO constraints: what the user asks of a model, in data units.

A constraint reads one number per example (its *reading*, e.g. the per-element MSE of the
reconstruction), compares it to a tolerance the user stated in the same data units, and
returns a per-example *value* that is <= 0 when the example meets the tolerance. Values are
per element of what the constraint reads (a pixel for MSE and BCE, a patch and channel for
pNCC, a feature; the classifier's cross-entropy is per image), so one GECO step size fits every
resolution; ``num_elements`` turns them into per-image units for the Lagrangian
(``lambda * num_elements * value``, next to a rate in nats per image).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, cast

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_geco.checks import is_count, is_number
from lightning_geco.classifier import check_class_labels, class_labels
from lightning_geco.frozen import FrozenClassifier, FrozenNetwork
from lightning_geco.geco import mse_to_psnr, psnr_to_mse
from lightning_geco.likelihoods import BernoulliLikelihood, binary_entropy
from lightning_geco.metrics import mean_and_standard_error
from lightning_geco.rebuild import Rebuildable
from lightning_geco.records import VAEOutput

if TYPE_CHECKING:
    from lightning_geco.models.base import VAEModule

__all__ = [
    "ClassificationConstraint",
    "Constraint",
    "ConstraintList",
    "FeatureReconstruction",
    "MAX_PSNR_DB",
    "NCC_MIN_CONTRAST",
    "NCC_STABILISER",
    "PatchNCC",
    "ReconstructionBCE",
    "ReconstructionMSE",
    "patch_ncc",
]

# Above ~100 dB the MSE (1e-10) is below what fp32 images in [0, 1] can resolve.
MAX_PSNR_DB = 100.0


def _mean_and_standard_error(values: Tensor) -> tuple[float, float]:
    """Mean of ``values`` (N,) and its standard error (0 for one value: no spread to allow for)."""
    values = values.detach().double().flatten()
    count = torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)
    mean, error = mean_and_standard_error(values.sum(), values.pow(2).sum(), count)
    return float(mean), float(error.nan_to_num(0.0))


class Constraint(Rebuildable, nn.Module):
    """Interface of a GECO constraint.

    Subclasses set ``name``, ``unit``, ``tolerance`` and ``reading_name`` and implement
    :meth:`reading` and :meth:`forward`. Every controller reads a constraint relative to
    :attr:`scale`: the default PI controller's error is ``ln(1 + value / scale)`` (for an MSE
    ``ln(reading / tolerance)``; for pNCC ``ln((1 - pncc) / (1 - minimum))``), and under
    ``GECOCallback(controller="relative")`` the step is ``nu * value / scale``, where
    ``step_size`` (None: the callback's ``step_size``; no units) gives this constraint its own
    ``nu``. The PI and paper controllers do not read ``step_size``.
    """

    name: str
    unit: str
    tolerance: float
    #: the metric the validation loop logs this constraint's reading under (``val/<reading_name>``)
    reading_name: str
    step_size: float | None = None
    #: whether a smaller reading is better (an MSE); False for a similarity such as pNCC
    lower_is_better: bool = True
    #: the ``__init__`` argument that states the tolerance (what ``--tolerance`` sets)
    tolerance_argument: str = "tolerance"
    #: whether it reads the raw decoder output (e.g. logits), which ``lagrangian`` must then be given
    reads_decoder_output: bool = False
    #: whether its reading of the images the model trains on is optimistic for new images, e.g.
    #: because a network that reads it was fit to those images; ``GECOCallback(drive="auto")``
    #: then drives lambda from a calibration split
    optimistic_on_training_images: bool = False

    def check_model(self, model: VAEModule) -> None:
        """Raise a clear error when the model cannot be constrained this way (called at construction)."""

    def check_data(self, output: VAEOutput) -> None:
        """Raise (or warn) when the first training batch shows the tolerance cannot be met."""

    def readings(self, output: VAEOutput) -> dict[str, Tensor]:
        """Every per-example reading logged for this constraint (``val/<key>``): the main one
        under ``reading_name``, and any others a subclass reports beside it."""
        return {self.reading_name: self.reading(output)}

    def name_readings_apart(self) -> None:
        """Log this constraint's readings under keys of its own, ``<reading>_<name>``: called by
        :class:`~lightning_geco.objectives.GECOObjective` when another of its constraints logs the
        same ``reading_name`` (two pNCC scales, two classifiers), which would otherwise share, and
        overwrite, one ``val/<reading>``."""
        self.reading_name = f"{type(self).reading_name}_{self.name}"

    @property
    def reading_tolerance(self) -> float:
        """The tolerance in the reading's units (what a chart of the reading draws as its line)."""
        return self.tolerance

    @property
    def scale(self) -> float:
        """What counts as a 100 % violation, in the value's units (default: the tolerance).

        The PI controller's error is ``ln(1 + value / scale)`` and the ``relative`` controller's
        step ``nu * value / scale``, so one setting fits an MSE of 0.005 and a cross-entropy of
        0.15 alike: both violate by "10 %" at 1.1x.
        """
        return self.reading_tolerance

    def relative_violation(self, reading: float) -> float:
        """How far a reading (e.g. a validation average) is past the tolerance, in units of
        :attr:`scale`: 0.05 is 5 % past it, -0.1 is 10 % better than asked; "past" is above an
        "at most" tolerance, below an "at least" one (``lower_is_better = False``)."""
        past = reading - self.reading_tolerance if self.lower_is_better else self.reading_tolerance - reading
        return past / self.scale

    def satisfied_by(self, reading: float) -> bool:
        """Whether a reading meets the tolerance."""
        return self.relative_violation(reading) <= 0.0

    def reading(self, output: VAEOutput) -> Tensor:
        """The raw per-example quantity the tolerance is stated on, shape (N,)."""
        raise NotImplementedError

    def forward(self, output: VAEOutput) -> Tensor:
        """Per-example constraint value, shape (N,), per element; <= 0 is feasible:
        ``reading - reading_tolerance`` (``reading_tolerance - reading`` when higher is better),
        which a model loaded under another tolerance relies on to move its moving average."""
        raise NotImplementedError

    def num_elements(self, output: VAEOutput) -> int:
        """Elements per example: the factor from per-element to per-image units."""
        return math.prod(output.x.shape[1:])  # not x[0].numel(): indexing is an op on every step

    def describe(self) -> dict[str, float | str]:
        """The constraint as stated by the user, for checkpoints and summaries."""
        return {"name": self.name, "tolerance": self.tolerance, "unit": self.unit}


class ConstraintList(nn.ModuleList):
    """An ``nn.ModuleList`` of constraints (same state-dict keys) whose iteration is typed
    :class:`Constraint`, not ``nn.Module``, for the code that reads their attributes."""

    def __iter__(self) -> Iterator[Constraint]:
        return cast(Iterator[Constraint], super().__iter__())


class ReconstructionMSE(Constraint):
    """Per-element mean squared error of the reconstruction at most a tolerance.

    Args:
        tolerance: in ``unit``: an MSE in the data's units squared, or a PSNR in dB.
        unit: ``"mse"`` or ``"psnr"``.
        name: the constraint's name in logs (``geco/<name>/...`` when there are several).
        peak: the data's peak value, i.e. their range (images in [0, 1]: 1, the default; data
            normalised to [-1, 1]: 2). With a peak an MSE
            tolerance lies in [peak² 1e-10, peak²] and a PSNR in (0, 100] dB (``MSE = peak² 10^(-PSNR/10)``:
            20 dB is 0.01 for images in [0, 1]). ``None``: data in any units (standardised
            vectors, raw sensor values): any positive MSE, and no PSNR.
        step_size: see :class:`Constraint`.
    """

    def __init__(
        self,
        tolerance: float = 0.01,
        unit: Literal["mse", "psnr"] = "mse",
        name: str = "reconstruction",
        peak: float | None = 1.0,
        step_size: float | None = None,
    ) -> None:
        super().__init__()
        if not is_number(tolerance):
            raise TypeError(f"ReconstructionMSE tolerance must be a number (in unit {unit!r}), got {tolerance!r}.")
        if peak is not None and not (is_number(peak) and math.isfinite(peak) and peak > 0):
            raise ValueError(f"ReconstructionMSE peak must be a positive finite number or None, got {peak!r}.")
        peak = None if peak is None else float(peak)
        if unit == "mse":
            if peak is None:
                if not (math.isfinite(tolerance) and tolerance > 0):
                    raise ValueError(
                        f"ReconstructionMSE tolerance {tolerance!r} (unit 'mse', no peak) must be a positive finite "
                        "MSE in the data's units squared."
                    )
            elif not (peak**2 * psnr_to_mse(MAX_PSNR_DB) <= tolerance <= peak**2) or math.isnan(tolerance):
                # Below the MSE of MAX_PSNR_DB no reading tells it apart: lambda would wind up to its bound.
                smallest = peak**2 * psnr_to_mse(MAX_PSNR_DB)
                range_text = (
                    f"[{smallest:g}, 1] (a PSNR of at most {MAX_PSNR_DB:g} dB)"
                    if peak == 1.0
                    else f"[{smallest:g}, {peak**2:g}] (peak {peak:g}; a PSNR of at most {MAX_PSNR_DB:g} dB)"
                )
                data_text = "images in [0, 1]" if peak == 1.0 else f"data with peak {peak:g}"
                # A number of decibels' size is most likely a PSNR written as an MSE.
                psnr_hint = (
                    f" A PSNR of {tolerance:g} dB is unit='psnr' (on the command line --tolerance psnr={tolerance:g})."
                    if max(peak**2, 10.0) <= tolerance <= MAX_PSNR_DB
                    else ""
                )
                raise ValueError(
                    f"ReconstructionMSE tolerance {tolerance!r} (unit 'mse') cannot be expressed: "
                    f"a per-element MSE of {data_text} must lie in {range_text}; for data in other units "
                    f"pass peak=None (in a config: peak: null).{psnr_hint}"
                )
            self.tolerance_mse = float(tolerance)
        elif unit == "psnr":
            if peak is None:
                raise ValueError("ReconstructionMSE unit 'psnr' needs the data's peak value; got peak=None.")
            if not (0.0 < tolerance <= MAX_PSNR_DB) or math.isnan(tolerance):
                raise ValueError(
                    f"ReconstructionMSE tolerance {tolerance!r} (unit 'psnr') is out of range: "
                    f"a PSNR in dB (peak {peak:g}) must lie in (0, {MAX_PSNR_DB:g}]."
                )
            self.tolerance_mse = peak**2 * psnr_to_mse(tolerance)
        else:
            raise ValueError(f"ReconstructionMSE unit must be 'mse' or 'psnr', got {unit!r}.")
        self.tolerance = float(tolerance)
        self.unit = unit
        self.name = name
        self.peak = peak
        self.step_size = _step_size("ReconstructionMSE", step_size)
        if peak is not None and self.tolerance_mse >= peak**2 / 4:
            # A constant image at the middle of the range is at most (peak / 2)^2 from every pixel.
            stated = f"a PSNR of {tolerance:g} dB" if unit == "psnr" else f"an MSE of {tolerance:g}"
            rank_zero_warn(
                f"ReconstructionMSE {name!r}: {stated} (MSE {self.tolerance_mse:.4g}) is met by a constant mid-grey "
                f"image, whose MSE is at most {peak**2 / 4:g} (a PSNR of {mse_to_psnr(0.25):.2f} dB) for data of range "
                f"{peak:g}: the constraint asks nothing of the model. A PSNR tolerance is in dB, e.g. "
                "--tolerance psnr=20 (MSE 0.01 for images in [0, 1])."
            )

    reading_name = "distortion"

    @property
    def reading_tolerance(self) -> float:
        return self.tolerance_mse

    @property
    def tolerance_psnr(self) -> float:
        """The tolerance in dB (peak 1 when the constraint has none)."""
        return mse_to_psnr(self.tolerance_mse / (self.peak or 1.0) ** 2)

    def check_data(self, output: VAEOutput) -> None:
        # A PSNR, or an MSE checked against a peak, means something only for data whose range is
        # the peak ([0, peak], or [-peak/2, peak/2] for signed data): data spanning more, or far
        # less (peak 255 on images in [0, 1]: 48 dB off), make the stated figure another quality
        # (images in [0, 255] under an MSE of 0.03 drove lambda to 6e12).
        if self.peak is None:
            return
        low, high = float(output.x.min()), float(output.x.max())
        span = high - low
        if span > (1 + 1e-3) * self.peak or span < 0.1 * self.peak:
            stated = f"a PSNR of {self.tolerance:g} dB" if self.unit == "psnr" else f"an MSE of {self.tolerance:g}"
            fix = (
                "or state the tolerance as an MSE (unit='mse', peak=None: the data's units squared)"
                if self.unit == "psnr"
                else "or pass peak=None (in a config: peak: null) for an MSE in the data's own units squared"
            )
            rank_zero_warn(
                f"ReconstructionMSE {self.name!r}: {stated} is stated against peak {self.peak:g} (data whose range "
                f"is {self.peak:g}, e.g. [0, {self.peak:g}]), but the first training batch spans [{low:.4g}, {high:.4g}]: "
                f"the quality it holds is not the one asked for. Scale the data to a range of {self.peak:g}, pass "
                f"peak= the data's range (max - min: 2 for data in [-1, 1]), {fix}."
            )

    def reading(self, output: VAEOutput) -> Tensor:
        return output.distortion

    def forward(self, output: VAEOutput) -> Tensor:
        return output.distortion - self.tolerance_mse


def _check_classifier_shape(classifier: FrozenNetwork, model: VAEModule) -> None:
    trained = tuple(getattr(classifier, "image_shape", ()))
    if trained != tuple(model.image_shape):
        raise ValueError(
            f"The classifier was trained on images of shape {trained}, the model makes {tuple(model.image_shape)}; "
            "train the classifier on the same data."
        )


def _positive_finite(owner: str, tolerance: float, unit: str) -> float:
    if not (is_number(tolerance) and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(
            f"{owner} tolerance must be a positive finite number of {unit}, got {tolerance!r}: "
            "a value of 0 or less can only be met by a perfect reconstruction, or never."
        )
    return float(tolerance)


def _step_size(owner: str, step_size: float | None) -> float | None:
    if step_size is not None and not (is_number(step_size) and math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"{owner} step_size must be a positive finite number or None, got {step_size!r}.")
    return None if step_size is None else float(step_size)


class ReconstructionBCE(Constraint):
    """Binary cross-entropy of the data under the decoder's Bernoulli probabilities, per element.

    For binary (or [0, 1]) data with a :class:`~lightning_geco.BernoulliLikelihood` decoder
    (its output is read as logits). ``-1/D sum_i [x_i log p_i + (1 - x_i) log(1 - p_i)]``.

    Attainable in principle: the tolerance must be positive (0 needs p = x exactly), and for
    data that are not binary it must exceed their own entropy per element, ``H(x)``, the floor
    of the cross-entropy: checked on the first training batch.

    Args:
        tolerance: nats per element.
        name, step_size: see :class:`Constraint`.
    """

    unit = "nats/element"
    reading_name = "bce"
    reads_decoder_output = True

    def __init__(self, tolerance: float = 0.1, name: str = "reconstruction", step_size: float | None = None) -> None:
        super().__init__()
        self.tolerance = _positive_finite("ReconstructionBCE", tolerance, "nats per element")
        self.name = name
        self.step_size = _step_size("ReconstructionBCE", step_size)
        if self.tolerance >= math.log(2):
            # Logits of 0 (p = 1/2) read ln 2 on any data in [0, 1].
            rank_zero_warn(
                f"ReconstructionBCE {name!r}: a tolerance of {self.tolerance:g} nats/element is met by a decoder that "
                f"outputs p = 1/2 everywhere, whose cross-entropy is ln 2 = {math.log(2):.4f} nats/element on any "
                "data in [0, 1]: the constraint asks nothing of the model (the binarised-MNIST config asks 0.08, met at "
                "31.6 nats)."
            )

    def check_model(self, model: VAEModule) -> None:
        if not isinstance(model.likelihood, BernoulliLikelihood):
            raise ValueError(
                "ReconstructionBCE reads the decoder output as Bernoulli logits, but the model's likelihood is "
                f"{type(model.likelihood).__name__}; use likelihood: lightning_geco.BernoulliLikelihood "
                "(or ReconstructionMSE for a Gaussian decoder)."
            )

    def check_data(self, output: VAEOutput) -> None:
        low, high = float(output.x.min()), float(output.x.max())
        if low < 0.0 or high > 1.0:
            # A cross-entropy against targets outside [0, 1] has no floor: images in [0, 255]
            # read -9313 nats/element, "met" by a factor of 10^5.
            raise ValueError(
                f"ReconstructionBCE reads the data as probabilities in [0, 1], but the first training batch spans "
                f"[{low:.4g}, {high:.4g}]. Scale the data to [0, 1] (e.g. x / 255), or use ReconstructionMSE."
            )
        floor = float(binary_entropy(output.x).mean())
        if floor >= self.tolerance:
            raise ValueError(
                f"ReconstructionBCE tolerance {self.tolerance:g} nats/element cannot be met: the data's own "
                f"entropy, the least cross-entropy any reconstruction can reach, is {floor:.4g} nats/element on "
                "this batch. Binarise the data or raise the tolerance."
            )
        if floor > 0 and self.tolerance < 1.1 * floor:
            # One batch's entropy is a sample: 64-image batches of grey MNIST read 0.0535-0.0644.
            rank_zero_warn(
                f"ReconstructionBCE tolerance {self.tolerance:g} nats/element lies within 10 % of the data's own "
                f"entropy on the first batch ({floor:.4g} nats/element), the floor no reconstruction goes under: "
                "other batches, and the validation set, may read above the tolerance whatever the model does."
            )

    def reading(self, output: VAEOutput) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(output.decoder_output.float(), output.x.float(), reduction="none")
        return bce.flatten(1).mean(dim=1)

    def forward(self, output: VAEOutput) -> Tensor:
        return self.reading(output) - self.tolerance


# SSIM's structure constant C3 = (0.03)^2 / 2 for data in [0, 1]: it keeps flat patches defined.
NCC_STABILISER = 0.03**2 / 2
# The least contrast, as a share of x's, up to which a patch of y counts as x's structure rescaled.
NCC_MIN_CONTRAST = 0.25


def patch_ncc(
    x: Tensor,
    y: Tensor,
    patch_size: int = 7,
    stride: int = 7,
    stabiliser: float = NCC_STABILISER,
    min_contrast: float = NCC_MIN_CONTRAST,
) -> Tensor:
    """Normalised cross-correlation of each patch of x and y, (N, C, H, W) -> (N, C, h, w).

    ``(cov(x, y) + c) / (std(x) max(std(y), k std(x)) + c)`` over each ``patch_size``^2 window,
    dimensionless, at most 1: SSIM's structure term ``(cov + c) / (std std + c)`` wherever y
    keeps at least ``k`` (``min_contrast``, 0.25) of x's contrast. It is 1 for identical patches,
    flat ones included; unchanged when a patch's brightness is shifted or its contrast scaled
    by a factor of at least k; a patch of x that is flat counts as matched whatever y holds.
    Below k the structure term alone would still read 1 (a flat reconstruction of a stroke
    patch read 0.99, so a blank image met any minimum): the correlation is read against
    k std(x) instead, so a flat reconstruction of a patch of variance v reads ``c / (k v + c)``
    (0.03 for v = 0.06), and one at contrast a < k reads about ``a / k``.
    """
    if x.dim() != 4 or min(x.shape[-2:]) < patch_size:
        raise ValueError(
            f"pNCC compares {patch_size}x{patch_size} patches of images (N, C, H, W) at least that large; "
            f"got data of shape {tuple(x.shape)}. For vectors use a reconstruction MSE."
        )
    pool = lambda t: F.avg_pool2d(t, patch_size, stride)  # noqa: E731
    x, y = x.float(), y.float()
    mean_x, mean_y = pool(x), pool(y)
    var_x = (pool(x * x) - mean_x.pow(2)).clamp_min(0.0)
    var_y = (pool(y * y) - mean_y.pow(2)).clamp_min(0.0)
    covariance = pool(x * y) - mean_x * mean_y
    # The tiny floor keeps sqrt's gradient finite on perfectly flat patches.
    std_x, std_y = (var_x + 1e-10).sqrt(), (var_y + 1e-10).sqrt()
    return (covariance + stabiliser) / (std_x * torch.maximum(std_y, min_contrast * std_x) + stabiliser)


class PatchNCC(Constraint):
    """Mean patch-wise normalised cross-correlation (pNCC) of x and its reconstruction at least ``minimum``.

    Insensitive to local brightness, and to contrast down to a quarter of the data's (see
    :func:`patch_ncc`: a blank reconstruction reads ~0); the value per example
    is ``minimum - pNCC``, per patch and channel (one "element" is one patch of one channel).

    Args:
        minimum: the least mean pNCC accepted, in (-1, 1): pNCC never exceeds 1, and anything
            at or below -1 always holds.
        patch_size, stride: the windows, in pixels.
        name, step_size: see :class:`Constraint`.
    """

    unit = "ncc"
    reading_name = "pncc"
    lower_is_better = False
    tolerance_argument = "minimum"

    def __init__(
        self,
        minimum: float = 0.8,
        patch_size: int = 7,
        stride: int = 7,
        name: str = "pncc",
        step_size: float | None = None,
    ) -> None:
        super().__init__()
        if not (is_number(minimum) and -1.0 < minimum < 1.0):
            raise ValueError(
                f"PatchNCC minimum must lie in (-1, 1), got {minimum!r}: a normalised cross-correlation is at "
                "most 1 (so 1 or more can never be met by an imperfect reconstruction) and -1 or less always holds."
            )
        if not (is_count(patch_size, 2) and is_count(stride, 1)):
            raise ValueError(f"PatchNCC needs ints patch_size >= 2 and stride >= 1, got {patch_size!r} and {stride!r}.")
        self.tolerance = float(minimum)
        self.patch_size, self.stride = operator.index(patch_size), operator.index(stride)
        self.name = name
        self.step_size = _step_size("PatchNCC", step_size)

    def init_args(self) -> dict[str, object]:
        return {"minimum": self.tolerance, "patch_size": self.patch_size, "stride": self.stride, "name": self.name,
                "step_size": self.step_size}

    def check_model(self, model: VAEModule) -> None:
        _, height, width = model.image_shape
        if min(height, width) < self.patch_size:
            raise ValueError(
                f"PatchNCC patch_size {self.patch_size} is larger than the {height}x{width} images; use a smaller patch."
            )

    @property
    def scale(self) -> float:
        # The room left below a perfect reconstruction (pNCC 1): at minimum 0.94, a reading of
        # 0.88 falls short by 100 %.
        return 1.0 - self.tolerance

    def reading(self, output: VAEOutput) -> Tensor:
        return patch_ncc(output.x, output.reconstruction, self.patch_size, self.stride).flatten(1).mean(dim=1)

    def forward(self, output: VAEOutput) -> Tensor:
        return self.tolerance - self.reading(output)

    def num_elements(self, output: VAEOutput) -> int:
        c, h, w = output.x.shape[1:]
        return c * ((h - self.patch_size) // self.stride + 1) * ((w - self.patch_size) // self.stride + 1)


class ClassificationConstraint(Constraint):
    """A frozen classifier applied to the reconstruction keeps the class: cross-entropy at most ``tolerance``.

    The class is the batch's label (``target="label"``) or the classifier's prediction on x
    itself (``target="prediction"``, no labels needed). Reading: the cross-entropy in nats per
    image (``val/class_cross_entropy``); beside it ``val/class_accuracy``, the fraction of
    reconstructions classified as that class.

    Args:
        classifier: the frozen classifier (e.g. ``FrozenClassifier(checkpoint=...)``).
        tolerance: nats per image, > 0 (log 2 ~ 0.69 is a coin flip between two classes).
        target: ``"label"`` or ``"prediction"``.
        name, step_size: see :class:`Constraint`.
    """

    unit = "nats/image"
    reading_name = "class_cross_entropy"
    # A classifier is more confident on the images it was trained on: on MNIST, GECO holding the
    # class cross-entropy at 0.15 on the training batches read 20 % past it on the test digits.
    optimistic_on_training_images = True

    def __init__(
        self,
        classifier: FrozenClassifier,
        tolerance: float = 0.1,
        target: Literal["label", "prediction"] = "label",
        name: str = "classification",
        step_size: float | None = None,
    ) -> None:
        super().__init__()
        self.tolerance = _positive_finite("ClassificationConstraint", tolerance, "nats per image")
        if target not in ("label", "prediction"):
            raise ValueError(f"ClassificationConstraint target must be 'label' or 'prediction', got {target!r}.")
        self.classifier = classifier
        self.target = target
        self.name = name
        self.step_size = _step_size("ClassificationConstraint", step_size)

    def check_model(self, model: VAEModule) -> None:
        _check_classifier_shape(self.classifier, model)

    def _targets(self, output: VAEOutput) -> Tensor:
        if self.target == "prediction":
            with torch.no_grad():
                return self.classifier.logits(output.x).argmax(dim=1)
        return class_labels(output.labels, self.classifier.label_column)

    def check_data(self, output: VAEOutput) -> None:
        if self.target == "label":
            check_class_labels(output.labels, self.classifier.label_column, self.classifier.num_classes)
        with torch.no_grad():
            per_image = F.cross_entropy(self.classifier.logits(output.x).float(), self._targets(output), reduction="none")
        # A cross-entropy is heavy-tailed (one misread digit costs nats): on MNIST a classifier of
        # 0.06 nats reads above 0.15 on 6 % of 64-image batches. Warn only when the first batch
        # shows it clearly, two standard errors above the tolerance.
        mean, error = _mean_and_standard_error(per_image)
        if mean - 2.0 * error > self.tolerance:
            rank_zero_warn(
                f"The classifier's cross-entropy on the real images is {mean:.4g} nats (+-{error:.2g}, the standard "
                f"error over the first batch's {per_image.numel()} images), above the tolerance {self.tolerance:g}: "
                "a faithful reconstruction will not meet it. Raise the tolerance or train a better classifier."
            )

    def reading(self, output: VAEOutput) -> Tensor:
        logits = self.classifier.logits(output.reconstruction)
        return F.cross_entropy(logits.float(), self._targets(output), reduction="none")

    def forward(self, output: VAEOutput) -> Tensor:
        return self.reading(output) - self.tolerance

    def num_elements(self, output: VAEOutput) -> int:
        return 1

    def readings(self, output: VAEOutput) -> dict[str, Tensor]:
        # One classifier pass for both readings.
        logits = self.classifier.logits(output.reconstruction).float()
        targets = self._targets(output)
        suffix = self.reading_name.removeprefix(type(self).reading_name)  # "_<name>" once named apart
        return {
            self.reading_name: F.cross_entropy(logits, targets, reduction="none"),
            f"class_accuracy{suffix}": (logits.argmax(dim=1) == targets).float(),
        }


class FeatureReconstruction(Constraint):
    """Mean squared distance between a frozen network's features of x and of the reconstruction.

    ``1/F ||f(x) - f(x_hat)||^2`` per example, F the number of feature elements; gradients
    reach the decoder through ``x_hat`` and never the network.

    Args:
        network: a :class:`~lightning_geco.frozen.FrozenNetwork` (``FrozenClassifier`` or
            ``TorchvisionFeatures``).
        tolerance: squared feature units per element, > 0.
        name, step_size: see :class:`Constraint`.
    """

    unit = "feature mse"
    reading_name = "feature_distance"

    def __init__(
        self, network: FrozenNetwork, tolerance: float = 0.01, name: str = "features", step_size: float | None = None
    ) -> None:
        super().__init__()
        self.tolerance = _positive_finite("FeatureReconstruction", tolerance, "squared feature units")
        self.network = network
        self.name = name
        self.step_size = _step_size("FeatureReconstruction", step_size)
        self._feature_elements: int | None = None  # known after the first reading

    def check_model(self, model: VAEModule) -> None:
        if getattr(self.network, "image_shape", None) is not None:
            # A max-pooling classifier reads any size: it would read features of images at a size
            # it never saw, silently; a flattening one failed in a matmul at the first step.
            _check_classifier_shape(self.network, model)
            return
        mean = getattr(self.network, "mean", None)
        channels = int(model.image_shape[0])
        if isinstance(mean, Tensor) and channels not in (1, mean.shape[1]):
            raise ValueError(
                f"FeatureReconstruction: the network reads {mean.shape[1]}-channel images (grey ones repeated), the model "
                f"makes {channels} channels."
            )

    def check_data(self, output: VAEOutput) -> None:
        # What a model that learned nothing reads: the first batch's mean image for every image
        # (a network too weak to tell images apart read a blank reconstruction "met", 40 % under).
        with torch.no_grad():
            target = self.network.features(output.x).float()
            mean_image = output.x.mean(dim=0, keepdim=True).expand_as(output.x)
            blank = (self.network.features(mean_image).float() - target).pow(2).flatten(1).mean(dim=1).mean()
        if blank <= self.tolerance:
            rank_zero_warn(
                f"FeatureReconstruction {self.name!r}: the first batch's mean image, given for every image, reads a "
                f"feature distance of {float(blank):.4g}, within the tolerance {self.tolerance:g}: a model that learned "
                "nothing meets it. Lower the tolerance, or give the constraint a network whose features tell the "
                "images apart (a better trained classifier), or add a pixel constraint beside it."
            )

    def reading(self, output: VAEOutput) -> Tensor:
        with torch.no_grad():
            target = self.network.features(output.x)
        features = self.network.features(output.reconstruction)
        self._feature_elements = target[0].numel()
        return (features.float() - target.float()).pow(2).flatten(1).mean(dim=1)

    def forward(self, output: VAEOutput) -> Tensor:
        return self.reading(output) - self.tolerance

    def num_elements(self, output: VAEOutput) -> int:
        if self._feature_elements is None:
            with torch.no_grad():
                self._feature_elements = self.network.features(output.x[:1]).numel()
        return self._feature_elements
