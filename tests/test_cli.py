"""Bad input through the real ``nnunet-ext`` command: one error line naming the fix, exit != 0, nothing written."""

import os

import pytest
from conftest import cli


def env_without(*names: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(extra)
    return env


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnunet-ext: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_plans_tiny_unknown_dataset(tmp_path):
    result = cli("nnunet-ext", "plans", "tiny", "-d", "999", env=env_without(nnUNet_preprocessed=str(tmp_path)),
                 check=False)
    assert_one_error_line(result, "dataset 999 not found", "nnUNetv2_plan_and_preprocess")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, variable", [
    (["plans", "tiny", "-d", "1"], "nnUNet_preprocessed"),
    (["synth", "-d", "1"], "nnUNet_raw"),
])
def test_missing_nnunet_folder_variable(command, variable):
    result = cli("nnunet-ext", *command, env=env_without(variable), check=False)
    assert_one_error_line(result, f"{variable} is not set", f"export {variable}=")


def test_synth_refuses_an_existing_dataset_id(tmp_path):
    existing = tmp_path / "Dataset005_Mine"
    (existing / "imagesTr").mkdir(parents=True)
    result = cli("nnunet-ext", "synth", "-d", "5", "--out", str(tmp_path), env=env_without(), check=False)
    assert_one_error_line(result, "Dataset005_Mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset005_Mine"]
    assert [p.name for p in existing.iterdir()] == ["imagesTr"]


@pytest.mark.parametrize("sparsity", [["--every", "0"], ["--slices", "0"], ["--slices", "99"]])
def test_synth_invalid_sparsity(tmp_path, sparsity):
    result = cli("nnunet-ext", "synth", "-d", "5", "--out", str(tmp_path), "--size", "16", "32", "32", *sparsity,
                 env=env_without(), check=False)
    assert_one_error_line(result, "sparsity")
    assert list(tmp_path.iterdir()) == []


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = cli("nnunet-ext", "demo", "--out", str(tmp_path), env=env_without(), check=False)
    assert_one_error_line(result, "not a demo folder", "--out")
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]
