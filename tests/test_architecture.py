"""The package's folders are layers: a module imports only from its own folder or from a lower
layer (docs/architecture.md). Read from the source (every import, including those inside
functions), so a new upward import fails here with the module and the line."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "src" / "neural_quantization"

# Bottom to top. A module may import its own unit (folder or top-level module) and any lower layer.
LAYERS = [
    ["_version", "config"],
    ["core"],
    ["formats"],
    ["kernels"],
    ["nn"],
    ["models"],
    ["export"],
    ["calibration", "reporting"],
    ["evaluation", "generation"],
    ["deploy", "analysis", "diffusion"],
    ["checks"],
    ["quantizer", "bench"],
    ["runner"],
    ["cli", "__init__"],
]
LEVEL = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """``kernels.triton.common`` -> ``kernels``; ``config`` -> ``config``."""
    return module.split(".")[0]


def imports(path: Path):
    """(imported module inside the package, line) for every import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neural_quantization"):
            rest = node.module.removeprefix("neural_quantization").lstrip(".")
            if rest:
                yield rest, node.lineno
            else:  # from neural_quantization import x
                for alias in node.names:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("neural_quantization."):
                    yield alias.name.removeprefix("neural_quantization."), node.lineno


MODULES = sorted(PACKAGE.rglob("*.py"))


def name_of(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def test_every_unit_has_a_layer():
    units = {unit_of(name_of(p)) for p in MODULES}
    assert units <= set(LEVEL), f"add {sorted(units - set(LEVEL))} to LAYERS (and docs/architecture.md)"


@pytest.mark.parametrize("path", MODULES, ids=[name_of(p) for p in MODULES])
def test_imports_point_down(path):
    here = unit_of(name_of(path))
    upward = [f"line {line}: {target}" for target, line in imports(path)
              if unit_of(target) != here and LEVEL[unit_of(target)] >= LEVEL[here]]
    assert not upward, f"{name_of(path)} (layer {LEVEL[here]}: {here}) imports from its own layer or above: {upward}"


def test_the_kernel_library_stands_alone():
    """kernels/ reads only the pure layouts below it (and the version string, which names the tuning
    cache's files): never nn/, models/, core/ or the configs."""
    for path in (PACKAGE / "kernels").rglob("*.py"):
        for target, line in imports(path):
            assert unit_of(target) in ("kernels", "formats", "_version"), f"{name_of(path)}:{line} imports {target}"


def test_only_the_cli_reads_argv_and_nothing_imports_it():
    for path in MODULES:
        if name_of(path) == "cli":
            continue
        assert "sys.argv" not in path.read_text(), f"{name_of(path)} reads sys.argv"
        assert all(unit_of(t) != "cli" for t, _ in imports(path)), f"{name_of(path)} imports cli"
