"""Every public module states its API in ``__all__``: each public top-level name is listed and
each listed name exists; the package exports the classes a user builds with."""

import ast
import importlib
from pathlib import Path

import pytest

import lightning_geco

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    p for p in [*(ROOT / "lightning_geco").rglob("*.py"), *(ROOT / "datamodules").glob("*.py")]
    if p.name != "__init__.py" or p.parent.name != "lightning_geco"
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "datamodules":  # installed as lightning_geco.datamodules
        parts = ("lightning_geco", *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _public_definitions(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                names.update(e.id for e in elements if isinstance(e, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


@pytest.mark.parametrize("path", MODULES, ids=_module_name)
def test_all_lists_every_public_name_and_only_existing_ones(path):
    module = importlib.import_module(_module_name(path))
    assert hasattr(module, "__all__"), f"{module.__name__} has no __all__"
    missing = _public_definitions(path) - set(module.__all__)
    assert not missing, f"{module.__name__}.__all__ lacks {sorted(missing)} (list them or prefix with _)"
    unknown = [name for name in module.__all__ if not hasattr(module, name)]
    assert not unknown, f"{module.__name__}.__all__ names what it does not define: {unknown}"


def test_package_exports_resolve_and_cover_the_building_blocks():
    assert all(hasattr(lightning_geco, name) for name in lightning_geco.__all__)
    for name in ("GECOCallback", "GECOObjective", "Constraint", "VAEOutput", "DiagonalGaussian", "LatentPass",
                 "MultiplierController", "CosineToFloor", "batch_images", "verdict_line", "RunSummary"):
        assert name in lightning_geco.__all__, name
