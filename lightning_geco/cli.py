"""The LightningCLI behind ``train.py``: W&B by default, the data's image shape linked to the model.

Beyond Lightning's CLI:

* ``--tolerance`` sets the constraints' tolerances (see :func:`apply_tolerances`).
* Each run's checkpoints go to ``<ModelCheckpoint dirpath>/<run id>/`` (the run id is the
  W&B run's id, else a fresh id after the logger's version); ``--ckpt_path last`` resumes the
  newest ``last.ckpt`` under the config's dirpath and continues that run: the same folder and
  the same W&B run id. After a finished fit, ``<dirpath>/last.ckpt`` links to that run's
  ``last.ckpt`` (what configs reading a trained network point at).
* A checkpoint whose model class or architecture differs from the config is refused, naming
  both values (Lightning's CLI would silently train the checkpoint's model instead).
* Configuration errors print their own message in a few lines, with a close match for a
  misspelt option, instead of jsonargparse's nested Union report and traceback.
* A fit that fails after W&B started finishes that run as failed and says so.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import os
import re
import shutil
import signal
import sys
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from jsonargparse import Namespace, lazy_instance
from jsonargparse._util import import_object
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lightning_geco.calibration import NO_CALIBRATION_SPLIT
from lightning_geco.callbacks import (
    GECOCallback,
    NonFiniteConstraintError,
    ObjectiveNeverCalledError,
    find_geco_objective,
)
from lightning_geco.datamodules.base import ImageDataModule
from lightning_geco.diagnostics import DiagnosticPanels
from lightning_geco.objectives import GECOObjective
from lightning_geco.resume import RandomState, UnreadableCheckpointError, checkpoint_head, mapped_checkpoint
from lightning_geco.summary import RunSummary, run_directory

__all__ = [
    "ConfigurationError",
    "GECOLightningCLI",
    "LINKED_KEYS",
    "RESUMED_SETTINGS",
    "SaveConfigToRun",
    "ShortErrorParser",
    "TOLERANCE_HELP",
    "apply_tolerances",
    "check_checkpoint_matches",
    "keep_the_checkpoints_optimizer_settings",
    "main",
    "newest_last_checkpoint",
    "short_parser_message",
]

TOLERANCE_HELP = (
    "Constraint tolerance, in the constraint's unit: '--tolerance 0.004' when the config has one "
    "constraint; 'NAME=VALUE' per constraint otherwise, NAME being the constraint's name "
    "(e.g. '--tolerance reconstruction=0.004 --tolerance pncc=0.95'). For a reconstruction MSE "
    "constraint NAME may also be a unit: 'mse=0.004' or 'psnr=24' (dB). Each constraint takes one "
    "--tolerance: a second is refused, not read as an override."
)


#: model settings filled in from the data when the classes are built (see add_arguments_to_parser)
LINKED_KEYS = ("image_shape",)


class ConfigurationError(ValueError):
    """A setting the run cannot use; the message names the setting, its value and what is accepted."""


# ------------------------------------------------------------------ --tolerance
def _constraint_namespaces(model: Namespace) -> list[Namespace]:
    objective = (model.get("init_args") or Namespace()).get("objective")
    constraints = (objective.get("init_args") or Namespace()).get("constraints") if objective else None
    if constraints is None:
        return []
    return list(constraints) if isinstance(constraints, list) else [constraints]


def _default_name(class_path: str) -> str:
    """A constraint's ``name`` when the config leaves it out: its class's default."""
    parameter = inspect.signature(import_object(class_path)).parameters.get("name")
    return parameter.default if parameter is not None else class_path.rsplit(".", 1)[-1]


def _tolerance_argument(class_path: str) -> str:
    """The constructor argument a constraint class states its tolerance in (PatchNCC: ``minimum``)."""
    return getattr(import_object(class_path), "tolerance_argument", "tolerance")


def apply_tolerances(model: Namespace, settings: list[str]) -> None:
    """Set the tolerances of the model config's constraints from ``--tolerance`` values, in place.

    Each setting is ``VALUE`` (only when there is one constraint) or ``NAME=VALUE``, NAME a
    constraint's ``name``, or for a :class:`~lightning_geco.ReconstructionMSE` its unit
    ``mse`` or ``psnr`` (which also sets the unit). A bare VALUE is in the constraint's unit as
    the config states it. Each constraint takes one setting: a second (``psnr=24`` then
    ``0.004``, which would read 0.004 dB) is refused, naming both. The constraint checks the
    value's range when it is built.
    """
    constraints = _constraint_namespaces(model)
    for constraint in constraints:
        if constraint.get("init_args") is None:
            constraint.init_args = Namespace()
    names = [c.init_args.get("name") or _default_name(c.class_path) for c in constraints]
    if not constraints:
        raise ConfigurationError(
            f"--tolerance {settings[0]!r}: the model's objective ({model.get('class_path')}) has no constraints to set."
        )
    given: dict[int, str] = {}  # constraint index -> the setting that set it

    def set_once(index: int, setting: str) -> None:
        if index in given:
            raise ConfigurationError(
                f"--tolerance {setting!r} sets {names[index]!r} again after --tolerance {given[index]!r}; "
                "give each constraint one --tolerance."
            )
        given[index] = setting

    for setting in settings:
        key, _, text = setting.rpartition("=")
        try:
            value = float(text)
        except ValueError:
            raise ConfigurationError(
                f"--tolerance {setting!r}: {text!r} is not a number; give VALUE, psnr=DB, mse=VALUE or NAME=VALUE "
                "(NAME a constraint's name)."
            ) from None
        if not key:
            if len(constraints) > 1:
                raise ConfigurationError(
                    f"--tolerance {setting!r} is ambiguous: the objective has {len(constraints)} constraints "
                    f"({', '.join(names)}); give NAME=VALUE, e.g. --tolerance {names[0]}={text}."
                )
            set_once(0, setting)
            constraints[0].init_args[_tolerance_argument(constraints[0].class_path)] = value
            continue
        matches = [i for i, name in enumerate(names) if name == key]
        unit = None  # set when NAME is a unit, not a constraint's name
        if not matches and key in ("mse", "psnr"):
            matches = [i for i, c in enumerate(constraints) if c.class_path.endswith("ReconstructionMSE")]
            unit = key
        if len(matches) != 1:
            accepted = names + (["mse", "psnr"] if any(c.class_path.endswith("ReconstructionMSE") for c in constraints) else [])
            raise ConfigurationError(
                f"--tolerance {setting!r}: {key!r} {'is no constraint' if not matches else 'names several constraints'} "
                f"of this config; accepted names: {', '.join(accepted)}."
            )
        (index,) = matches
        set_once(index, setting)
        constraint = constraints[index]
        if unit is not None:
            constraint.init_args["unit"] = unit
        constraint.init_args[_tolerance_argument(constraint.class_path)] = value


# ------------------------------------------------------ checkpoint vs config
def _as_comparable(value: Any) -> Any:
    return [_as_comparable(v) for v in value] if isinstance(value, (tuple, list)) else value


def check_checkpoint_matches(model: Namespace, hyperparameters: dict[str, Any], ckpt_path: str) -> None:
    """Refuse a checkpoint whose model class or architecture keys differ from the config's."""
    config_class = import_object(model.class_path)
    saved_path = hyperparameters.get("_class_path")
    if saved_path:
        saved_class = import_object(saved_path)
        if saved_class is not config_class:
            raise ConfigurationError(
                f"--ckpt_path {ckpt_path} holds a {saved_class.__name__} ({saved_path}); the config builds a "
                f"{config_class.__name__} ({model.class_path}). Resume with the config the checkpoint was trained "
                "with, or start a new run without --ckpt_path."
            )
    init_args = model.get("init_args") or Namespace()
    for piece in ("objective", "likelihood"):  # the pieces a model is given: refused when of another class
        saved = (hyperparameters.get(piece) or {}).get("class_path")
        configured = init_args.get(piece)
        configured_path = configured.get("class_path") if isinstance(configured, Namespace) else None
        if saved and configured_path and import_object(saved) is not import_object(configured_path):
            raise ConfigurationError(
                f"--ckpt_path {ckpt_path} was trained with the {piece} {saved}; the config's {piece} is "
                f"{configured_path} (--model.init_args.{piece}). Resume with the {piece} it was trained with, "
                "or start a new run without --ckpt_path."
            )
    saved_constraints, configured_constraints = _saved_constraints(hyperparameters), _configured_constraints(model)
    if saved_constraints is not None and configured_constraints and saved_constraints != configured_constraints:
        # The multipliers are one per constraint: another list does not load (a size-mismatch trace).
        raise ConfigurationError(
            f"--ckpt_path {ckpt_path} was trained with the constraints {_listed(saved_constraints)}; the config has "
            f"{_listed(configured_constraints)}. A checkpoint holds one lambda per constraint: resume with its "
            "constraints, or start a new run without --ckpt_path."
        )
    for key in getattr(config_class, "architecture_keys", ()):
        # image_shape comes from the data only when the classes are built (a link): the
        # model's on_load_checkpoint compares it then.
        if key in LINKED_KEYS:
            continue
        if key in hyperparameters and init_args.get(key) is not None:
            saved, configured = _as_comparable(hyperparameters[key]), _as_comparable(init_args[key])
            if saved != configured:
                raise ConfigurationError(
                    f"--ckpt_path {ckpt_path} was trained with {key}={saved!r}; the config asks for "
                    f"{key}={configured!r} (--model.init_args.{key}). A checkpoint only loads into the model it was "
                    "built for: use its setting, or start a new run without --ckpt_path."
                )


def _saved_constraints(hyperparameters: dict[str, Any]) -> list[tuple[str, str]] | None:
    """(class name, constraint name) of each constraint a checkpoint's objective records; None
    where it records none (another objective, or one that did not state its arguments)."""
    objective = hyperparameters.get("objective") or {}
    constraints = (objective.get("init_args") or {}).get("constraints") if isinstance(objective, dict) else None
    if not isinstance(constraints, list) or not all(isinstance(c, dict) and "class_path" in c for c in constraints):
        return None
    try:
        return [
            (str(c["class_path"]).rsplit(".", 1)[-1], (c.get("init_args") or {}).get("name") or _default_name(c["class_path"]))
            for c in constraints
        ]
    except (ImportError, AttributeError, ValueError):  # a class not importable here: loading says so
        return None


def _configured_constraints(model: Namespace) -> list[tuple[str, str]]:
    """The same of the config's objective (empty when it has none)."""
    return [
        (str(c.class_path).rsplit(".", 1)[-1], (c.get("init_args") or Namespace()).get("name") or _default_name(c.class_path))
        for c in _constraint_namespaces(model)
    ]


def _listed(constraints: list[tuple[str, str]]) -> str:
    return "[" + ", ".join(f"{kind} {name!r}" for kind, name in constraints) + "]"


#: model settings a resumed run cannot change: the optimizer and its schedule continue from the checkpoint
RESUMED_SETTINGS = ("learning_rate", "lr_schedule")


def keep_the_checkpoints_optimizer_settings(model: Namespace, hyperparameters: dict[str, Any], ckpt_path: str) -> None:
    """Build a resumed run's model with the checkpoint's optimizer settings (``RESUMED_SETTINGS``),
    warning with both values where the config asks for others: the optimizer and its schedule
    continue from the checkpoint, and the model (its ``configure_optimizers``, the
    hyperparameters its next checkpoint records) must say what they are."""
    init_args = model.get("init_args") or Namespace()
    keys = [
        key
        for key in RESUMED_SETTINGS
        if key in hyperparameters
        and init_args.get(key) is not None
        and _as_comparable(hyperparameters[key]) != _as_comparable(init_args[key])
    ]
    changed = [f"{key}={hyperparameters[key]!r} (the config asks for {init_args[key]!r})" for key in keys]
    for key in keys:
        init_args[key] = hyperparameters[key]
    if changed:
        model_class = str(model.get("class_path") or "ConvVAE").rsplit(".", 1)[-1]
        rank_zero_warn(
            f"--ckpt_path {ckpt_path} continues its optimizer and learning-rate schedule with {', '.join(changed)}: "
            "a resumed run keeps the checkpoint's. To train with the new setting, start a new run (initialised "
            f"from the checkpoint's weights with {model_class}.load_from_checkpoint if you want them) without --ckpt_path."
        )


def _checkpoint_folders(config: Namespace) -> list[Path]:
    """The ``dirpath`` of every ModelCheckpoint in the config: each holds one folder per run."""
    folders = []
    for callback in config.trainer.get("callbacks") or []:
        if isinstance(callback, Namespace) and callback.get("class_path", "").endswith("ModelCheckpoint"):
            dirpath = (callback.get("init_args") or Namespace()).get("dirpath")
            if dirpath:
                folders.append(Path(dirpath))
    return folders


def newest_last_checkpoint(folders: list[Path]) -> Path | None:
    """The most recently written ``<folder>/<run id>/last*.ckpt`` across ``folders``, if any."""
    found = [path for folder in folders for path in folder.glob("*/last*.ckpt") if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


# ------------------------------------------------------------- short errors
def _chain(error: BaseException, as_shown: bool = False) -> list[BaseException]:
    """An exception and the ones it was raised from, outermost first (``as_shown``: as Python's
    traceback shows them, stopping where ``raise ... from None`` hid the context)."""
    chain, seen = [error], {id(error)}
    while True:
        last = chain[-1]
        inner = last.__cause__ or (None if as_shown and last.__suppress_context__ else last.__context__)
        if inner is None or id(inner) in seen:
            return chain
        chain.append(inner)
        seen.add(id(inner))


#: the folders of the library's own code (the package and its DataModules)
_OWN_CODE = (Path(__file__).resolve().parent, Path(inspect.getfile(ImageDataModule)).resolve().parent)


def _raised_by_the_library(error: BaseException) -> bool:
    """Whether ``error`` was raised in the library's own code (its innermost traceback frame)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and any(Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(root) for root in _OWN_CODE)


def _innermost_mistake(
    error: BaseException, kinds: tuple[type[BaseException], ...], library_only: bool = False
) -> BaseException | None:
    """The innermost error of ``kinds`` in the chain as shown that the library itself raised (its
    message names the file or the setting, also where it was raised from another library's
    error); else, unless ``library_only``, the innermost of ``kinds``; None without one."""
    mistakes = [e for e in _chain(error, as_shown=True) if isinstance(e, kinds)]
    ours = [e for e in mistakes if _raised_by_the_library(e)]
    found = ours if library_only else ours or mistakes
    return found[-1] if found else None


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (jsonargparse wraps a constructor's error several times)."""
    return _chain(error)[-1]


def short_parser_message(message: str, options: list[str]) -> str:
    """jsonargparse's report cut to its cause, with a close match for an unknown option."""
    unknown = re.search(r"Problem with given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    if unknown:
        class_path, option = unknown.groups()
        try:
            accepted = list(inspect.signature(import_object(class_path)).parameters)
        except (ImportError, ValueError, TypeError):
            accepted = []
        close = difflib.get_close_matches(option, accepted, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else f" Accepted: {', '.join(accepted)}."
        return f"{class_path} has no option {option!r}.{hint}"
    unrecognized = re.search(r"unrecognized arguments: (\S+)", message)
    if unrecognized:
        option = unrecognized.group(1).split("=")[0]
        close = difflib.get_close_matches(option, options, n=1)
        return f"unknown option {option}." + (f" Did you mean {close[0]}?" if close else "")
    not_ours = re.search(r"Import path \S+ does not correspond to a subclass of ImageDataModule", message)
    if not_ours:
        return (
            f"{not_ours.group(0)}: train.py reads a subclass of lightning_geco.datamodules.ImageDataModule (an "
            "image_shape and build_splits; README, 'Your own DataModule on the command line')."
        )
    nested = _nested_cause(message)
    if nested is not None:
        return nested
    # Otherwise the deepest listed error that is not the 'or None' alternative.
    reasons = [
        line.strip()[2:]
        for line in message.splitlines()
        if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line and "Problem with" not in line
    ]
    return reasons[-1] if reasons else message.splitlines()[0]


#: lines of jsonargparse's nested Union report that frame a cause rather than state one
_REPORT_FRAMES = (
    "Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
    "- Expected a <class 'NoneType'>", "Parser key ", "- Problem with given class_path ",
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _nested_cause(message: str) -> str | None:
    """The deepest cause of jsonargparse's nested report on a ``class_path`` / ``init_args``
    value, with the option it belongs to (``model.init_args.latent_dim (lightning_geco.ConvVAE):
    Expected a <class 'int'>. Got value: abc``; the report's first line alone, 'Parser key
    "model":', named neither); None for a message of another shape."""
    lines = message.splitlines()
    causes = [(i, _indent(line)) for i, line in enumerate(lines) if line.strip() and not line.strip().startswith(_REPORT_FRAMES)]
    if not causes or not any("Problem with given class_path" in line for line in lines):
        return None
    where, level = max(causes, key=lambda cause: (cause[1], -cause[0]))
    path: list[str] = []  # from the cause outwards: option keys, and the classes they were given
    for line in reversed(lines[:where]):
        if _indent(line) >= level:
            continue
        text = line.strip()
        if key := re.match(r'Parser key "([^"]+)":', text):
            path.append(key.group(1))
        elif given := re.match(r"- Problem with given class_path '([^']+)':", text):
            path.append("class_path=" + given.group(1))
        else:
            continue
        level = _indent(line)
    path.reverse()
    dotted = ".".join("init_args" if part.startswith("class_path=") else part for part in path)
    cause = lines[where].strip()
    if path and path[-1].startswith("class_path="):  # the class itself: not found, or not accepted
        class_path = path[-1].removeprefix("class_path=")
        missing = re.match(r"module '([\w.]+)' has no attribute '(\w+)'", cause)
        hint = ""
        if missing:
            try:
                close = difflib.get_close_matches(missing.group(2), dir(importlib.import_module(missing.group(1))), n=1)
            except ImportError:
                close = []
            hint = f" Did you mean {missing.group(1)}.{close[0]}?" if close else ""
        return f"{dotted.removesuffix('.init_args')}.class_path {class_path}: {cause}.{hint}"
    classes = [part.removeprefix("class_path=") for part in path if part.startswith("class_path=")]
    return f"{dotted}" + (f" ({classes[-1]})" if classes else "") + f": {cause}"


class ShortErrorParser(LightningArgumentParser):
    """A LightningArgumentParser whose errors are the cause in a line or two, not the usage and a
    nested Union report; ``--help`` still lists every option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A shortened option (--trainer.max_step) is an error naming the full one, not silently it.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        options = [option for action in self._actions for option in action.option_strings]
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {short_parser_message(message, options)}\n(see {prog} --help)\n")
        self.exit(2)


#: the --ckpt_path names Lightning resolves itself (a resumed fit's; nothing on a fresh Trainer)
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def _callback_state(checkpoint: dict[str, Any], callback: str) -> dict[str, Any]:
    """The saved state of the checkpoint's first callback of class ``callback`` (Lightning keys
    them by class name and arguments); empty where there is none."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if str(key).startswith(callback) and isinstance(state, dict):
            return state
    return {}


def _written_into(checkpoint: dict[str, Any]) -> Path | None:
    """The folder a checkpoint's ModelCheckpoint wrote it into (its saved ``dirpath``), if any."""
    dirpath = _callback_state(checkpoint, "ModelCheckpoint").get("dirpath")
    return Path(dirpath).resolve() if dirpath else None


def _planned_steps_of(checkpoint: dict[str, Any]) -> int | None:
    """The optimizer steps the checkpoint's fit planned (its GECOCallback's stall detector keeps
    them); None where it does not say."""
    detector = _callback_state(checkpoint, "GECOCallback").get("stall_detector")
    last_step = detector.get("last_step") if isinstance(detector, dict) else None
    return last_step if isinstance(last_step, int) else None


def _check_test_split(datamodule: Any, checkpoint_data: dict[str, Any] | None = None) -> None:
    """Refuse a test of data without a test split, or, given the checkpoint's DataModule states,
    one of the checkpoint's model's own training data (its test files; its shapes of another seed)."""
    state = (checkpoint_data or {}).get(type(datamodule).__qualname__)
    remember = getattr(datamodule, "remember_training", None)
    if state is not None and callable(remember):
        remember(state)
    missing = getattr(datamodule, "missing_test_split", None)
    reason = missing() if callable(missing) else None
    if reason is not None:
        _fail(reason)


def _as_list(callbacks: Any) -> list[Any]:
    """``configure_callbacks()``'s answer (a callback or a sequence of them) as a list."""
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


#: Lightning's refusal of two stateful callbacks of one kind (two GECOCallbacks), a trace in train.py
_DUPLICATE_CALLBACK = re.compile(r"Found more than one stateful callback of type `(\w+)`")


def _fail(message: str, exit_code: int = 2) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(exit_code)


# ------------------------------------------------------------------- the CLI
class SaveConfigToRun(SaveConfigCallback):
    """Saves the run's full config as ``config.yaml`` in the run's own folder (``<stage>_config.yaml``
    for ``test`` and ``validate``) and logs it as hyperparameters, with the objective's constraints
    also at the top level: ``constraints.<name>.tolerance`` and ``.unit``."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # --tolerance is in the model's constraints already: kept as well, the saved file ran the
        # flag's list back as one string and could not be run again.
        resolved = self.config.clone()
        resolved.pop("tolerance", None)
        if resolved.get("trainer") is not None and resolved.trainer.get("precision") is not None:
            # What ran: Lightning falls back from 16-mixed to bf16-mixed on a CPU, with a warning.
            resolved.trainer.precision = str(trainer.precision)
        if trainer.is_global_zero:
            directory = run_directory(trainer)
            directory.mkdir(parents=True, exist_ok=True)
            # A test or validation beside the trained run (with --trainer.logger false both write
            # into runs/) keeps the run's own config.yaml.
            stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn (a str enum)
            name = "config.yaml" if stage == "fit" else f"{stage}_config.yaml"
            self.parser.save(resolved, directory / name, skip_unset=False, overwrite=True, multifile=False)
        config = yaml.safe_load(self.parser.dump(resolved, skip_unset=False))
        # The tolerances at the top level too, as a dashboard groups and filters runs by them
        # (inside the model's objective they are a list entry, which W&B shows as one JSON cell).
        constraints = getattr(getattr(pl_module, "objective", None), "constraints", None) or []
        if constraints:
            config["constraints"] = {c.name: {"tolerance": c.tolerance, "unit": c.unit} for c in constraints}
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class GECOLightningCLI(LightningCLI):
    """LightningCLI for the collection; every run ends with ``summary.json`` and prints its path last."""

    #: the id of the run a ``--ckpt_path`` inside ``<dirpath>/<run id>/`` continues
    resumed_run_id: str | None = None
    #: (path, hyperparameters) of the checkpoint a ``--ckpt_path`` resumes
    _checkpoint: tuple[str, dict[str, Any]] | None = None
    #: that checkpoint's DataModule states, by state key (its class's qualname)
    _checkpoint_data: dict[str, Any] | None = None
    #: that checkpoint's weight shapes, by state-dict key
    _checkpoint_shapes: dict[str, tuple[int, ...]] | None = None

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test: Lightning's ``predict`` returns its outputs to Python, so from
        the command line it ran the model and wrote nothing (``trainer.predict`` stays, in Python)."""
        return {name: skipped for name, skipped in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data", "model.init_args.image_shape", compute_fn=lambda data: list(data.image_shape), apply_on="instantiate"
        )
        parser.add_argument("--tolerance", action="append", type=str, default=None, help=TOLERANCE_HELP)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # jsonargparse prints --print_config while it parses, before --tolerance is applied;
        # with both flags the config is printed here instead, as it will run.
        argv = list(sys.argv[1:] if args is None else args) if args is None or isinstance(args, (list, tuple)) else None
        printing = [a for a in argv or [] if a == "--print_config" or a.startswith("--print_config=")]
        if not printing or not any(a == "--tolerance" or a.startswith("--tolerance=") for a in argv or []):
            super().parse_arguments(parser, args)
            return
        self.config = parser.parse_args([a for a in argv or [] if a not in printing])
        config = (self.config[self.config.subcommand] if self.config.get("subcommand") else self.config).clone()
        try:
            apply_tolerances(config.model, config.tolerance)
        except ConfigurationError as error:
            _fail(str(error))
        for key in ("config", "tolerance", "__path__"):
            config.pop(key, None)
        sys.stdout.write(yaml.safe_dump(config.as_dict(), sort_keys=False))
        raise SystemExit(0)

    def _parse_ckpt_path(self) -> None:
        # Replaces Lightning's, which overwrites the config's model with the checkpoint's
        # hyperparameters: the command line is what runs, and a checkpoint of another model is
        # refused instead of silently trained.
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        ckpt_path = config.get("ckpt_path")
        folders = _checkpoint_folders(config) if "trainer" in config else []
        from_last = ckpt_path == "last" and bool(folders)
        fitting = self.config.subcommand == "fit"
        if from_last:
            found = newest_last_checkpoint(folders)
            if found is None:
                where = ", ".join(f"{f}/<run id>/" for f in folders)
                if not fitting:  # an untrained model's figures would read as the trained one's
                    _fail(f"--ckpt_path last: no checkpoint under {where}; train one first (train.py fit).")
                rank_zero_warn(f"--ckpt_path last: no checkpoint under {where}; this is a new run from step 0.")
            config.ckpt_path = ckpt_path = str(found) if found else None
        if not ckpt_path or (fitting and ckpt_path in _LIGHTNING_CKPT_NAMES):
            return  # Lightning's own names, resolved by the Trainer
        if ckpt_path in _LIGHTNING_CKPT_NAMES:
            # On a fresh Trainer Lightning finds none of these and evaluates the untrained model.
            if folders:  # "last" was found above; Lightning's other names mean nothing to a new process
                where = ", ".join(f"{f}/<run id>/" for f in folders)
                _fail(
                    f"--ckpt_path {ckpt_path}: {self.config.subcommand} reads a checkpoint file, and '{ckpt_path}' names "
                    f"one only in the process that trained (its ModelCheckpoint's memory); pass the file's path (the "
                    f"runs are under {where}) or --ckpt_path last (the config's newest run)."
                )
            _fail(
                f"--ckpt_path {ckpt_path}: {self.config.subcommand} reads a checkpoint file; this config's "
                "ModelCheckpoint has no dirpath to find it in, so pass the file's path."
            )
        if not Path(ckpt_path).is_file():
            _fail(f"--ckpt_path {ckpt_path}: no such file (resolved: {Path(ckpt_path).resolve()}).")
        try:
            checkpoint = mapped_checkpoint(ckpt_path)
        except UnreadableCheckpointError as error:
            _fail(f"--ckpt_path {error}")
        # Through the <dirpath>/last.ckpt link too: the run is the folder the file is in; for the
        # copy written where there are no symlinks, the folder its ModelCheckpoint wrote into.
        run_folder = Path(ckpt_path).resolve().parent
        if any(run_folder == folder.resolve() for folder in folders):
            run_folder = _written_into(checkpoint) or run_folder
        if any(run_folder.parent == folder.resolve() for folder in folders):
            self.resumed_run_id = run_folder.name
        hyperparameters, step = checkpoint_head(checkpoint)
        # The DataModule's part (read now, from this one load; checked once the DataModule exists).
        self._checkpoint_data = {
            key: state for key, state in checkpoint.items() if isinstance(state, dict) and "shuffle_seed" in state
        }
        weights = checkpoint.get("state_dict")
        self._checkpoint_shapes = (
            {key: tuple(value.shape) for key, value in weights.items() if isinstance(value, torch.Tensor)}
            if isinstance(weights, dict)
            else None
        )
        if from_last:  # "last" is the newest of the config's runs: say which, so a wrong one shows
            run = Path(ckpt_path).parent.name
            doing = f"resuming run {run} from" if self.config.subcommand == "fit" else f"{self.config.subcommand}: run {run} at"
            planned = _planned_steps_of(checkpoint)
            unfinished = (
                f", of {planned} planned: a run stopped before its end (interrupted, or stopped early)"
                if not fitting and isinstance(step, int) and planned is not None and step < planned
                else ""
            )
            rank_zero_info(f"--ckpt_path last: {doing} step {step}{unfinished} ({ckpt_path}).")
        try:
            check_checkpoint_matches(config.model, hyperparameters, ckpt_path)
        except ConfigurationError as error:
            _fail(str(error))
        if fitting:  # only a resumed fit continues the checkpoint's optimizer and schedule
            keep_the_checkpoints_optimizer_settings(config.model, hyperparameters, ckpt_path)
        self._checkpoint = (ckpt_path, hyperparameters)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        interval = trainer.get("val_check_interval") if trainer is not None else None
        if isinstance(interval, float) and trainer.get("check_val_every_n_epoch") is None:
            # The Trainer refuses it as it is built, in a 30-line trace that does not say the fix.
            _fail(
                f"--trainer.val_check_interval {interval!r}: a float is a fraction of an epoch (1.0: once an epoch), "
                "which needs --trainer.check_val_every_n_epoch (this config sets it null, to validate every N "
                "training batches): add --trainer.check_val_every_n_epoch 1, or give val_check_interval in training "
                "batches (an int, e.g. 500: optimizer steps unless gradients accumulate)."
            )
        if config.get("tolerance"):
            try:
                apply_tolerances(config.model, config.tolerance)
            except ConfigurationError as error:
                _fail(str(error))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:  # noqa: BLE001 - reported as its cause; the chain stays attached
            # A constructor's own refusal, wherever jsonargparse's Union report put it in the chain.
            # (A missing file a constructor reads, such as a classifier checkpoint, is one of them.)
            refusal = _innermost_mistake(error, (ValueError, TypeError, FileNotFoundError), library_only=True)
            if refusal is not None:
                _fail(str(refusal))
            cause = _root_cause(error)
            if isinstance(cause, RuntimeError) and (twice := _DUPLICATE_CALLBACK.search(str(cause))):
                _fail(
                    f"--trainer.callbacks holds more than one {twice.group(1)} (the config's, and one added?): keep one. "
                    "A checkpoint keeps one state per callback of a kind."
                )
            if isinstance(cause, ModuleNotFoundError) and "tensorboard" in str(cause):
                _fail(f"{str(cause).splitlines()[0]} TensorBoardLogger needs it: pip install -e \".[tensorboard]\"")
            if isinstance(cause, (ValueError, TypeError, ImportError)):
                _fail(str(cause))
            raise

    def before_fit(self) -> None:
        # What can be checked before the W&B run starts is checked here, so a mistake costs no run.
        if self.trainer.max_steps == 0:
            _fail("--trainer.max_steps 0 trains no step; set it > 0 (or -1 to train for --trainer.max_epochs).")
        self._check_image_shape()
        self._check_weight_shapes()
        self._check_dataset()
        self._check_held_out_split()
        has_objective = any(isinstance(module, GECOObjective) for module in self.model.modules())
        # The module's own configure_callbacks() are attached when the fit starts, after this.
        callbacks = [*getattr(self.trainer, "callbacks", []), *_as_list(self.model.configure_callbacks())]
        if has_objective and not any(isinstance(c, GECOCallback) for c in callbacks):
            # Else the first training step raises, after the W&B run has started, in a trace.
            _fail(
                f"the config's {type(self.model).__name__} trains on a GECOObjective, and the trainer has no "
                "GECOCallback to move its lambda: add '- class_path: lightning_geco.GECOCallback' under "
                "trainer.callbacks (or --trainer.callbacks+ lightning_geco.GECOCallback)."
            )
        if any(isinstance(c, GECOCallback) for c in callbacks):
            try:  # else refused at setup, after the W&B run has started (an objective without constraints)
                find_geco_objective(self.model)
            except ValueError as error:
                _fail(str(error))
        if getattr(self.trainer, "fast_dev_run", False):  # set by Lightning's init, not declared
            # Lightning means fast_dev_run to write no checkpoint, but 2.6's ModelCheckpoint writes
            # save_last's at the end of training all the same: a smoke test's model would become
            # what --ckpt_path last resumes and tests.
            for checkpoint in self.trainer.checkpoint_callbacks:
                if isinstance(checkpoint, ModelCheckpoint):
                    checkpoint.save_last = False
        if getattr(self.datamodule, "num_calibration", None) == 0:
            for callback in getattr(self.trainer, "callbacks", []):
                if isinstance(callback, GECOCallback) and callback.drive == "calibration" and callback.calibration_dataset is None:
                    _fail(NO_CALIBRATION_SPLIT)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                # Two warnings every run printed, neither the user's to act on: Lightning passes
                # anonymous=None, and wandb looks for a git root in its folder before making it.
                if logger._wandb_init.get("anonymous") is None:
                    logger._wandb_init.pop("anonymous", None)
                if logger.save_dir:
                    os.makedirs(logger.save_dir, exist_ok=True)
        self._checkpoints_into(self._run_id())

    def _check_image_shape(self) -> None:
        """Refuse, before the W&B run starts, a checkpoint trained on images of another shape than
        the data gives (its weights would not load)."""
        if self._checkpoint is None:
            return
        path, hyperparameters = self._checkpoint
        saved, current = hyperparameters.get("image_shape"), getattr(self.model, "hparams", {}).get("image_shape")
        if saved is not None and current is not None and list(saved) != list(current):
            _fail(
                f"--ckpt_path {path} was trained on images of shape {tuple(saved)}; the data gives "
                f"{tuple(current)} ({type(self.datamodule).__name__}). A checkpoint only loads into the model it was "
                "built for: use the data settings it was trained with, or start a new run without --ckpt_path."
            )

    def _check_weight_shapes(self) -> None:
        """Refuse, before the W&B run starts, a checkpoint whose weights have other shapes than the
        config's model (a module of the user's built with another latent size: Lightning's
        size-mismatch trace came after the run had started). The collection's models are refused
        by their architecture settings (:func:`check_checkpoint_matches`), which this backs up."""
        if self._checkpoint is None or not self._checkpoint_shapes:
            return
        model_shapes = {key: tuple(value.shape) for key, value in self.model.state_dict().items()}
        differing = [
            f"{key} {saved} in the checkpoint, {model_shapes[key]} in the model"
            for key, saved in self._checkpoint_shapes.items()
            if key in model_shapes and model_shapes[key] != saved
        ]
        if not differing:
            return
        path, hyperparameters = self._checkpoint
        settings = getattr(self.model, "hparams", {})
        plain = (int, float, str, bool, list, tuple)  # settings to name; a module or a tensor is not one
        changed = [
            f"{key}={hyperparameters[key]!r} (the config: {settings[key]!r})"
            for key in settings
            if key in hyperparameters
            and isinstance(settings[key], plain)
            and isinstance(hyperparameters[key], plain)
            and _as_comparable(hyperparameters[key]) != _as_comparable(settings[key])
        ]
        more = f" (and {len(differing) - 2} more)" if len(differing) > 2 else ""
        _fail(
            f"--ckpt_path {path} holds weights of other shapes than the config's {type(self.model).__name__}: "
            f"{'; '.join(differing[:2])}{more}."
            + (f" It was trained with {', '.join(changed)}." if changed else "")
            + " A checkpoint only loads into the model it was built for: use its settings, or start a new run "
            "without --ckpt_path."
        )

    def _run_id(self) -> str:
        """The resumed run's id, else this run's W&B id / logger version, else a fresh id."""
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                if self.resumed_run_id:
                    # WandbLogger passes id (with resume="allow") to wandb.init, which continues
                    # that run; it reads both from its init dict when the experiment starts.
                    logger._wandb_init["id"] = logger._id = self.resumed_run_id
                    return self.resumed_run_id
                if self.trainer.is_global_zero:
                    return logger.experiment.id  # starts the W&B run (fit would), which fixes its id
        if self.resumed_run_id:
            return self.resumed_run_id
        # A fresh id: another logger's version (version_0) repeats across its save_dirs. Other
        # ranks get rank 0's folder: ModelCheckpoint broadcasts its dirpath in setup.
        fresh = uuid.uuid4().hex[:8]
        # (fast_dev_run's stand-in logger has version "": no folder name starting with "-")
        if self.trainer.loggers and self.trainer.loggers[0].version not in (None, ""):
            version = self.trainer.loggers[0].version
            return f"{version if isinstance(version, str) else f'version_{version}'}-{fresh}"
        return fresh

    def fit(self, model: LightningModule, **kwargs: Any) -> None:
        try:
            self.trainer.fit(model, **kwargs)
        except BaseException as error:
            # The launched ranks first: the launcher's watcher SIGKILLs every process once a child
            # exits non-zero, and they may be on their way out (a forwarded SIGTERM).
            self._stop_launched_ranks()
            self._finish_wandb(failed_with=error)
            if self.trainer.is_global_zero and (self._interruption(error) or self.trainer.global_step > 0):
                try:
                    line = self._where_to_resume()
                except Exception as unreadable:  # a checkpoint cut short must not hide the error itself
                    line = f"GECO: stopped at step {self.trainer.global_step} (its checkpoints could not be read: {unreadable})"
                sys.stderr.write(line + "\n")
            _fail_short(error)
            self._exit_if_terminated(error)
            raise

    def before_test(self) -> None:
        # Checked before the W&B run starts, as before_fit does: a test with nothing to read.
        _check_test_split(self.datamodule)
        self.before_validate()

    def before_validate(self) -> None:
        # A checkpoint of one of the config's runs is read where fit wrote it, so Lightning's
        # ModelCheckpoint does not warn that its dirpath changed (test and validate write none).
        self._check_image_shape()
        self._check_weight_shapes()
        self._check_dataset()
        if self.subcommand == "test":  # once the checkpoint is known to fit the config
            _check_test_split(self.datamodule, self._checkpoint_data)
        if self.resumed_run_id is not None:
            self._checkpoints_into(self.resumed_run_id)
        if self.subcommand == "validate":
            self._check_held_out_split()

    def _check_dataset(self) -> None:
        """Warn when the checkpoint's model trained on another DataModule than this run reads:
        Lightning restores a DataModule's state by its class name, so another one gets none,
        and nothing of it is checked (a Fashion-MNIST model tested under the MNIST config)."""
        name = type(self.datamodule).__qualname__
        if not self._checkpoint_data or name in self._checkpoint_data:
            return
        trained = ", ".join(sorted(self._checkpoint_data))
        doing = "resumes on" if self.subcommand == "fit" else f"{self.subcommand}s it on"
        what = "it is not that run continued" if self.subcommand == "fit" else "its figures are of data it did not train on"
        rank_zero_warn(f"The checkpoint's model was trained on {trained}; this run {doing} {name}, another dataset: {what}.")

    def _check_held_out_split(self) -> None:
        """Refuse, before the W&B run starts, a split that would validate on images the
        checkpoint's model trained on (the DataModule refuses it again when the Trainer restores)."""
        check = getattr(self.datamodule, "check_checkpoint_data", None)
        if self._checkpoint_data is None or check is None:
            return
        state = self._checkpoint_data.get(type(self.datamodule).__qualname__) or {}
        try:
            check(state, fitting=self.subcommand == "fit")
        except ValueError as error:
            _fail(str(error))

    def _checkpoints_into(self, run_id: str) -> None:
        """Point every ModelCheckpoint of the config at its ``<dirpath>/<run id>/`` folder."""
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
                callback.dirpath = os.path.join(callback.dirpath, run_id)

    def test(self, model: LightningModule, **kwargs: Any) -> None:
        """``train.py test``: the trained model (``--ckpt_path``) on the DataModule's test split."""
        self._evaluate("test", self.trainer.test, model, **kwargs)

    def validate(self, model: LightningModule, **kwargs: Any) -> None:
        """``train.py validate``: the trained model (``--ckpt_path``) on the validation split."""
        self._evaluate("validate", self.trainer.validate, model, **kwargs)

    def _evaluate(self, subcommand: str, run: Callable[..., Any], model: LightningModule, **kwargs: Any) -> None:
        if kwargs.get("ckpt_path") is None:
            _fail(
                f"train.py {subcommand} reads a trained model: pass --ckpt_path PATH, or --ckpt_path last for "
                "this config's newest run."
            )
        try:
            run(model, **kwargs)
        except BaseException as error:
            self._stop_launched_ranks()
            self._finish_wandb(failed_with=error)
            _fail_short(error)
            self._exit_if_terminated(error)
            raise

    def _exit_if_terminated(self, error: BaseException) -> None:
        """Exit 143 (128 + SIGTERM, as a process SIGTERM ends) for Lightning's SIGTERMException,
        which is SystemExit(None): exit status 0, a finished run's, so a job scheduler that
        stopped the run would record it as succeeded. Only in the process that launched the
        others (local rank 0): a rank Lightning's launcher started exiting non-zero would have
        the launcher's watcher SIGKILL them all, this one too."""
        if isinstance(error, SIGTERMException) and self.trainer.local_rank == 0:
            raise SystemExit(128 + signal.SIGTERM) from error

    def _stop_launched_ranks(self) -> None:
        """End the processes this one launched (Lightning's DDP launcher starts ranks 1.. as its
        children), and wait for them, before a failure ends the command: an error raised on this
        rank alone (missing data, found by prepare_data on rank 0) left them waiting in a
        collective until the connection dropped, and they printed a trace after the command had
        returned. Lightning does the same on Ctrl-C."""
        launcher = self.trainer.strategy.launcher
        launched = getattr(launcher, "procs", None)  # _SubprocessScriptLauncher's children
        if not launched:
            return
        # Emptied first: the launcher's watcher thread reads this list, and a child it finds
        # killed makes it SIGKILL every process, this one too (exit code 137, the message lost).
        processes = list(launched)
        launched.clear()
        for process in processes:
            with contextlib.suppress(Exception):
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)

    def after_test(self) -> None:
        summary = self._run_summary()
        self._end_evaluation(summary.test_verdict_line, summary.test_path)

    def after_validate(self) -> None:
        summary = self._run_summary()
        self._end_evaluation(summary.validate_verdict_line, summary.validate_path)

    def _end_evaluation(self, verdict_line: str, summary_path: Path | None) -> None:
        if self.trainer.is_global_zero:
            self._finish_wandb()
            _print_ending(verdict_line, summary_path)

    def _run_summary(self) -> RunSummary:
        # Trainer.callbacks is set by Lightning's callback connector, not declared on the class.
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
        return next(c for c in callbacks if isinstance(c, RunSummary))

    def _interruption(self, error: BaseException) -> str | None:
        """What interrupted the fit, in words, or None for an error of its own."""
        if not (isinstance(error, SystemExit) and self.trainer.interrupted):
            return None
        # Lightning's loop raises this SystemExit after a SIGTERM (kill, a job scheduler's stop);
        # it turns Ctrl-C into a plain SystemExit(1) after its graceful shutdown.
        return "a SIGTERM (kill, or a job scheduler's stop)" if isinstance(error, SIGTERMException) else "an interrupt (Ctrl-C)"

    def _where_to_resume(self) -> str:
        """One line after a fit that stopped early: the step this run's newest checkpoint holds and
        the path to resume it from, or that it wrote none (and which run ``last`` would take)."""
        stopped = f"GECO: stopped at step {self.trainer.global_step}"
        folders = [
            Path(c.dirpath) for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath
        ]
        written = [path for folder in folders for path in folder.glob("*.ckpt") if path.is_file()]
        if written:
            newest = max(written, key=lambda path: path.stat().st_mtime)
            shown = newest.relative_to(Path.cwd()) if newest.is_relative_to(Path.cwd()) else newest
            return f"{stopped}; this run's newest checkpoint holds step {checkpoint_head(newest)[1]}: resume with --ckpt_path {shown}"
        line = f"{stopped}, before this run wrote a checkpoint (the configs write one after each validation): nothing of it to resume"
        other = newest_last_checkpoint([folder.parent for folder in folders])
        if other is not None:
            line += f"; --ckpt_path last would take another run, {other.parent.name} at step {checkpoint_head(other)[1]}"
        return line

    def _finish_wandb(self, failed_with: BaseException | None = None) -> None:
        if not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
                run_dir = Path(logger.experiment.dir).parent
                logger.experiment.finish(exit_code=1 if failed_with is not None else 0)
                mode = os.environ.get("WANDB_MODE", "online")
                if failed_with is None:
                    print(f"W&B run ({mode}): {run_dir}")
                else:
                    # The error itself follows (its line, or its trace): named here, said once.
                    cause = self._interruption(failed_with) or type(failed_with).__name__
                    sys.stderr.write(f"W&B run ({mode}) {run_dir} finished as failed (exit code 1) by {cause}\n")

    def after_fit(self) -> None:
        summary = self._run_summary()
        if not self.trainer.is_global_zero:
            return
        self._finish_wandb()
        self._link_last_checkpoints()
        _print_ending(summary.verdict_line, summary.path)

    def _link_last_checkpoints(self) -> None:
        # <dirpath>/last.ckpt -> <run id>/last.ckpt: the stable path of the newest finished run,
        # which configs reading a trained network (the classification constraint) point at.
        for callback in self.trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.last_model_path:
                continue
            last = Path(callback.last_model_path)
            link = last.parent.parent / "last.ckpt"
            link.unlink(missing_ok=True)
            try:
                link.symlink_to(Path(last.parent.name) / last.name)
            except OSError:  # no symlinks (e.g. Windows without the privilege): a copy
                shutil.copyfile(last, link)


def _print_ending(verdict_line: str, summary_path: Path | None) -> None:
    """A run's last lines: its verdict (a GECO model's), then its summary's path (always the
    last line; none under fast_dev_run, which writes no files)."""
    if verdict_line:
        print(verdict_line)
    if summary_path is not None:
        print(summary_path, flush=True)


def _fail_short(error: BaseException) -> None:
    """Exit with the message of a mistake in the data or the settings, or of one of GECO's stops,
    not a 50-line trace (which LIGHTNING_GECO_TRACEBACK=1 brings back); return for
    anything else, which the caller raises."""
    mistake = _innermost_mistake(error, (ValueError, TypeError, FileNotFoundError))
    if mistake is None:  # GECO's own stops (a run of non-finite steps, an objective never called): said, too
        mistake = _innermost_mistake(error, (NonFiniteConstraintError, ObjectiveNeverCalledError))
    if mistake is not None and not os.environ.get("LIGHTNING_GECO_TRACEBACK"):
        _fail(f"{mistake}\n(LIGHTNING_GECO_TRACEBACK=1 shows the traceback)", exit_code=1)


def main(args: list[str] | None = None, **kwargs: Any) -> GECOLightningCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); W&B logs offline unless WANDB_MODE says otherwise."""
    os.environ.setdefault("WANDB_MODE", "offline")
    # Lightning 2.6 calls a torch API torch 2.14 deprecates, on every run: not the user's to act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    return GECOLightningCLI(
        # Any LightningModule: the VAEs, and the classifier the classification constraint reads.
        LightningModule,
        ImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToRun,
        parser_class=ShortErrorParser,
        save_config_kwargs={"save_to_log_dir": False},
        trainer_defaults={
            # Absolute: W&B's service process keeps the working directory of the first run in
            # this process and would resolve a relative folder against that.
            "logger": lazy_instance(WandbLogger, project="lightning_geco", save_dir=os.path.abspath("runs")),
            # With --trainer.logger false the run's config.yaml and summary.json go here, not to
            # the working directory.
            "default_root_dir": os.path.abspath("runs"),
            "callbacks": [RunSummary(), RandomState(), DiagnosticPanels()],
        },
        args=args,
        **kwargs,
    )
