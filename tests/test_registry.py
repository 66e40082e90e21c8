"""How nnU-Net finds our trainers (through nnUNet_extTrainer) and the package layout (trainers/, architectures/
and dataset_conversion/ installed under nnunet_ext)."""

import ast
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import nnunetv2
import pytest
from conftest import BIN, TEST_TRAINER_DIR
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

import nnunet_ext.trainers as ours
from nnunet_ext.nnunet_paths import EXT_TRAINER_VAR, ext_trainer_value, registry_folder

REPO = Path(__file__).resolve().parents[1]
BARE_NAMES = {"trainers", "architectures", "dataset_conversion"}


@pytest.mark.parametrize("name", ours.__all__)
def test_nnunet_finds_our_trainer_as_the_same_picklable_class(name, monkeypatch):
    monkeypatch.setenv(EXT_TRAINER_VAR, ext_trainer_value(None))
    found = recursive_find_trainer_class_by_name(name)
    assert found is getattr(ours, name)
    assert pickle.loads(pickle.dumps(found)) is found
    assert found.__module__.startswith("nnunet_ext.trainers.")


def test_lookup_goes_through_every_folder_of_the_variable(monkeypatch):
    monkeypatch.setenv(EXT_TRAINER_VAR, ext_trainer_value(str(TEST_TRAINER_DIR)))
    assert recursive_find_trainer_class_by_name("nnUNetTrainer_exttest").__name__ == "nnUNetTrainer_exttest"
    assert recursive_find_trainer_class_by_name("nnUNetTrainer_demo") is ours.nnUNetTrainer_demo


@pytest.mark.parametrize("name", ours.__all__)
def test_no_public_name_clashes_with_a_stock_trainer(name):
    stock_folder = os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")
    assert recursive_find_python_class(stock_folder, name, "nnunetv2.training.nnUNetTrainer") is None


def test_env_appends_to_an_existing_value_once():
    other = "/opt/other_trainers"
    script = f'export {EXT_TRAINER_VAR}={other}; eval "$({BIN}/nnunet-ext env)"; eval "$({BIN}/nnunet-ext env)"; ' \
             f'echo "${EXT_TRAINER_VAR}"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == os.pathsep.join([other, registry_folder()])


def test_env_root_prints_all_nnunet_folders(tmp_path):
    result = subprocess.run([str(BIN / "nnunet-ext"), "env", "--root", str(tmp_path)],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[:3] == [f"export {v}={tmp_path / v}" for v in ("nnUNet_raw", "nnUNet_preprocessed",
                                                                "nnUNet_results")]
    assert lines[3].startswith(f"export {EXT_TRAINER_VAR}=")


def test_registry_defines_no_class_of_its_own():
    for module in Path(registry_folder()).glob("*.py"):
        tree = ast.parse(module.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)], module


def _python_files():
    for folder in ("nnunet_ext", "trainers", "architectures", "dataset_conversion", "tests"):
        yield from (REPO / folder).rglob("*.py")


def test_nothing_imports_the_bare_folder_names():
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in BARE_NAMES]
    assert offenders == []


def test_wheel_installs_the_top_level_folders_under_nnunet_ext(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((REPO / name).read_bytes())
    modules = []
    for folder in ("nnunet_ext", "trainers", "architectures", "dataset_conversion"):
        for path in (REPO / folder).rglob("*.py"):
            modules.append(path.relative_to(REPO).as_posix())
            target = source / modules[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    subprocess.run([str(BIN / "python"), "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    str(source), "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("nnunet_ext-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every module of the source tree is in the wheel, the top-level folders mounted under nnunet_ext/.
    for module in modules:
        assert (module if module.startswith("nnunet_ext/") else f"nnunet_ext/{module}") in names
    assert "nnunet_ext/_registry/nnunet_ext_trainers.py" in names
    assert not [n for n in names if n.split("/")[0] in BARE_NAMES]
