"""The packages' layering: the kernel package imports nothing of the models (onestep_models
builds on onestep_kernels, never the other way), the preference data imports nothing of
onestep (the resolver reads it without an import cycle), and importing the kernels leaves
process-wide settings alone."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import onestep_kernels

KERNELS = Path(onestep_kernels.__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names, at any depth (function-level imports
    included), relative ones resolved against onestep_kernels."""
    package = ".".join(("onestep_kernels", *path.parent.relative_to(KERNELS).parts))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                if node.level else []
            found.add(".".join([*base, *([node.module] if node.module else [])]))
    return found


def test_no_module_of_the_kernel_package_imports_the_models():
    offenders = {str(path.relative_to(KERNELS)): sorted(m for m in imported_modules(path)
                                                         if m.startswith("onestep_models"))
                 for path in KERNELS.rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_preference_data_imports_nothing_of_onestep():
    modules = imported_modules(KERNELS / "preferences.py")
    assert not [m for m in modules if m.startswith("onestep")], modules


def test_importing_every_kernel_module_loads_no_model_module():
    names = sorted(".".join(("onestep_kernels", *p.relative_to(KERNELS).with_suffix("").parts))
                   .removesuffix(".__init__") for p in KERNELS.rglob("*.py")
                   if p.name != "__main__.py")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import importlib, sys
        for name in {names!r}:
            importlib.import_module(name)
        loaded = [m for m in sys.modules if m.startswith("onestep_models")]
        assert not loaded, loaded
        print("ok")
    """)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
