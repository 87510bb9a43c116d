"""The package layout, read from the source (nothing is imported but `vllm_ht` itself):
- only the vLLM hooks (vllm_ht/vllm/), the tools (vllm_ht/tools/), the CLI and the distillation
  job (training/distill.py) import vLLM, at module level or inside functions;
- importing any other module never loads vLLM, not even through the package's own imports;
- the hooks log through vLLM's logger (handler, format, `warning_once`).

Worked example of the import walk: vllm_ht/tools/offline.py is `vllm_ht.tools.offline`, so its
`from ..vllm.env import apply_cpu_defaults` imports `vllm_ht`, `vllm_ht.vllm` and `vllm_ht.vllm.env`.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vllm_ht"
MAY_IMPORT_VLLM = ("vllm_ht.vllm", "vllm_ht.tools", "vllm_ht.cli", "vllm_ht.training.distill")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def may_import_vllm(name: str) -> bool:
    return any(name == allowed or name.startswith(allowed + ".") for allowed in MAY_IMPORT_VLLM)


def imports(name: str, module_level_only: bool = False) -> set[str]:
    """Absolute names of what module `name` imports (with the parent packages an import loads)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    if module_level_only:   # statements that run on import: the module body and its if/try blocks
        nodes, todo = [], list(tree.body)
        while todo:
            node = todo.pop()
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try)):
                todo += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                         *[s for h in getattr(node, "handlers", []) for s in h.body]]
    else:
        nodes = list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES}
    with_parents = set()
    for imported in found:
        parts = imported.split(".")
        with_parents |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return with_parents


def is_vllm(name: str) -> bool:
    return name == "vllm" or name.startswith("vllm.")


def test_the_walk_sees_relative_and_function_level_imports():
    assert {"vllm_ht.vllm", "vllm_ht.vllm.env", "vllm_ht.prompts", "vllm"} <= imports("vllm_ht.tools.offline")
    assert "vllm" not in imports("vllm_ht.tools.offline", module_level_only=True)   # imported in run()
    assert "vllm_ht.vllm.engine_args" in imports("vllm_ht")                           # the lazy export
    assert is_vllm("vllm.logger") and not is_vllm("vllm_ht.vllm")


def test_only_hooks_tools_cli_and_distill_import_vllm():
    offenders = {name: sorted(filter(is_vllm, imports(name))) for name in MODULES if not may_import_vllm(name)}
    assert {name: found for name, found in offenders.items() if found} == {}
    assert any(is_vllm(i) for i in imports("vllm_ht.vllm.runner"))   # the walk does see vLLM imports


def test_importing_the_core_never_loads_vllm():
    """Module-level imports only, followed through the package: `import vllm_ht.X` for a core X."""
    def loads_vllm(name: str, seen: set[str]) -> list[str] | None:
        if name in seen:
            return None
        seen.add(name)
        for imported in sorted(imports(name, module_level_only=True)):
            if is_vllm(imported):
                return [name, imported]
            if imported in MODULES and (chain := loads_vllm(imported, seen)):
                return [name, *chain]
        return None

    chains = {name: loads_vllm(name, set()) for name in MODULES if not may_import_vllm(name)}
    assert {name: " -> ".join(chain) for name, chain in chains.items() if chain} == {}


def test_hooks_log_through_vllms_logger():
    """`init_logger("vllm." + __name__)`: a `vllm_ht.*` logger would have no handler in vLLM's
    processes (vLLM configures the "vllm" logger), so INFO lines such as the per-batch plan vanish."""
    for name, path in MODULES.items():
        if not name.startswith("vllm_ht.vllm."):
            continue
        source = path.read_text(encoding="utf-8")
        assert "getLogger" not in source, f"{path}: use vLLM's init_logger"
        for arg in re.findall(r"init_logger\(([^)]*)\)", source):
            assert arg == 'f"vllm.{__name__}"', f"{path}: init_logger({arg}) is not under vLLM's logger"


def test_package_exports_without_importing_vllm():
    setup_version = re.search(r'^__version__ = "([^"]+)"', (PACKAGE / "__init__.py").read_text(), re.M)
    assert "version=VERSION" in (ROOT / "setup.py").read_text() and setup_version
    code = ("import sys, vllm_ht\n"
            "assert 'vllm' not in sys.modules\n"
            "from vllm_ht import ht_engine_kwargs\n"
            "assert 'vllm' not in sys.modules, 'the export imports vLLM'\n"
            "print(vllm_ht.__version__, ht_engine_kwargs.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [setup_version.group(1), "vllm_ht.vllm.engine_args"]
