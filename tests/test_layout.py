"""The package's structure: no private names across modules, a command line that imports only what a command
needs, one version string."""

import ast
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from nnunet_ext import cli

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it is installed as (pyproject.toml package-dir).
SOURCES = {"nnunet_ext": "nnunet_ext", "trainers": "nnunet_ext.trainers",
           "architectures": "nnunet_ext.architectures", "dataset_conversion": "nnunet_ext.dataset_conversion"}


def _package_of(path: Path) -> str:
    folder = path.parent.relative_to(ROOT)
    return ".".join([SOURCES[folder.parts[0]], *folder.parts[1:]])


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_a_private_name_of_another():
    offences = []
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            package = _package_of(path)
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("nnunet_ext"):
                    continue
                parts = node.module.split(".")
                # A private module may be imported from inside the package that holds it.
                for i, part in enumerate(parts):
                    if _private(part) and ".".join(parts[:i]) != package:
                        offences.append(f"{path.relative_to(ROOT)}:{node.lineno} imports module {node.module}")
                offences += [f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from {node.module}"
                             for alias in node.names if _private(alias.name)]
    assert offences == []


def _imports_after(argv: list[str]) -> set[str]:
    """Top-level packages imported by ``nnunet-ext ARGV`` (its output and exit status are not looked at)."""
    code = ("import sys\nfrom nnunet_ext import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return set(result.stderr.strip().splitlines()[-1].split())


def test_env_and_help_import_neither_torch_nor_nnunet():
    heavy = {"torch", "nnunetv2", "dask", "skimage", "scipy"}
    assert _imports_after(["env"]) & heavy == set()
    assert _imports_after(["--help"]) & heavy == set()


def test_top_level_help_is_the_help_each_module_registers():
    parser = cli.build_parser()  # every command complete
    commands = next(a for a in parser._actions if a.dest == "command")
    helps = {action.dest: action.help for action in commands._choices_actions}
    assert {name: helps[name] for name in cli.LAZY_COMMANDS} == cli.LAZY_COMMANDS


def test_one_version_string(capsys):
    import nnunet_ext

    assert version("nnunet-ext") == nnunet_ext.__version__
    try:
        cli.main(["--version"])
    except SystemExit as stop:
        assert stop.code == 0
    assert capsys.readouterr().out.strip() == f"nnunet-ext {nnunet_ext.__version__}"
