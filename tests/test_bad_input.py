"""Issue 16: bad input that was silently wrong, ended in a traceback or left files behind.

Each test builds the smallest input that showed the problem (tmp_path only) and checks the one-line error, the
exit code of the real ``nnunet-ext`` entry point where the issue was about the CLI, and that nothing is left.
"""

import errno
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from test_plans import stock_plans
from test_sparsify import write_dense_dataset

from nnunet_ext import cli
from nnunet_ext.dataset_conversion import fucci, lsfm, selma3d
from nnunet_ext.datasets import raw_dataset, readers, sparsify, synth
from nnunet_ext.datasets.raw_dataset import dataset_json, nifti_is_complete, write_image
from nnunet_ext.datasets.synth import write_synthetic_dataset
from nnunet_ext.errors import UserError, sigterm_raises
from nnunet_ext.evaluation import evaluate_folder
from nnunet_ext.nnunet_paths import NNUNET_FOLDERS
from nnunet_ext.plans import derive_attention_plans
from nnunet_ext.pseudo_label_generation import create_pseudolabels

TINY_SYNTH = dict(num_cases=1, num_test_cases=0, shape=(8, 16, 16))
TINY_SYNTH_ARGS = ["--cases", "1", "--test-cases", "0", "--size", "8", "16", "16"]


def listing(folder) -> list[str] | None:
    """Every entry (hidden ones included), or None if the folder does not exist."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else None


def write_tif(path, array, **kwargs):
    tifffile.imwrite(path, array, photometric="minisblack", **kwargs)  # a 3- or 4-slice stack is not RGB
    return path


def one_line(capsys) -> str:
    """The single stderr line of a CLI call that failed."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnunet-ext: error: "), lines
    return lines[0]


@pytest.fixture
def no_nnunet_folders(monkeypatch):
    for var in NNUNET_FOLDERS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def no_verify(monkeypatch):
    """nnU-Net's integrity check spawns a worker (~4 s) and is not what these tests are about."""
    calls = []
    monkeypatch.setattr(raw_dataset, "verify_raw_dataset", lambda folder, *a, **k: calls.append(folder))
    monkeypatch.setattr(lsfm, "verify_raw_dataset", lambda folder, *a, **k: calls.append(folder))
    monkeypatch.setattr(sparsify, "verify_raw_dataset", lambda folder, *a, **k: calls.append(folder))
    return calls


# ------------------------------------------------------------------------- 1. gaps in a slice folder


GAPPY = (0, 1, 2, 5, 6, 7)  # six files: position 3 would be file 5, position 5 file 7


def write_gappy_slices(folder, dtype=np.uint16):
    folder.mkdir(parents=True)
    for number in GAPPY:
        tifffile.imwrite(folder / f"slice_{number:04d}.tif", np.full((4, 5), number, dtype))
    return folder


def test_slice_folder_with_a_gap_is_refused_by_the_shared_reader(tmp_path):
    with pytest.raises(UserError, match="slice_0005.tif: slice numbers jump from 2 to 5") as info:
        readers.read_volume(write_gappy_slices(tmp_path / "slices"))
    assert "\n" not in str(info.value)


def test_lsfm_refuses_a_gappy_channel_folder(tmp_path, no_verify):
    masks = tmp_path / "masks"
    masks.mkdir()
    tifffile.imwrite(masks / "frame_000005.tif", np.ones((4, 5), np.uint8))  # would land on the image of file 7
    with pytest.raises(UserError, match="jump from 2 to 5"):
        lsfm.convert([write_gappy_slices(tmp_path / "C488")], masks, tmp_path / "raw", 510, spacing=(1, 1, 1))
    assert listing(tmp_path / "raw") is None and no_verify == []


def test_selma3d_refuses_a_gappy_whole_brain(tmp_path):
    with pytest.raises(UserError, match="jump from 2 to 5"):
        selma3d.scan_slice_folder(write_gappy_slices(tmp_path / "brain", np.int16))


# ------------------------------------------------------------------------- 2. evaluate --gt with sparse labels


def write_labels(folder, arrays: dict, labels: dict):
    """Label files in ``folder`` and the dataset.json beside it."""
    folder.mkdir(parents=True)
    for case, array in arrays.items():
        write_image(array, folder / case, (1.0, 1.0, 1.0))
    (folder.parent / "dataset.json").write_text(json.dumps(dataset_json("X", {0: "c"}, labels, len(arrays))))
    return folder


def test_evaluate_refuses_sparse_ground_truth(tmp_path):
    # Dense truth: vessel at (0,0,0) and (1,0,0); the sparse labels annotate slice 0 only (ignore = 2 elsewhere).
    # Counting ignore voxels as background, the perfect prediction scored 2 * 1 / (2 + 1) = 0.667.
    dense = np.zeros((2, 2, 2), np.uint8)
    dense[:, 0, 0] = 1
    sparse = np.full_like(dense, 2)
    sparse[0] = dense[0]
    labels = {"background": 0, "vessel": 1, "ignore": 2}
    write_labels(tmp_path / "ds" / "labelsTr", {"a": sparse}, labels)
    write_labels(tmp_path / "ds2" / "labelsTr_dense", {"a": dense}, labels)
    pred = write_labels(tmp_path / "pred" / "p", {"a": dense}, labels)
    with pytest.raises(UserError, match="a.nii.gz has ignore-label voxels \\(value 2\\).*--annotated"):
        evaluate_folder(pred, tmp_path / "ds" / "labelsTr", topology=False)
    # Dense truth beside the same dataset.json (ignore declared, not present) is scored: a perfect 1.0.
    scores = evaluate_folder(pred, tmp_path / "ds2" / "labelsTr_dense", topology=False)
    assert scores["cases"]["a"]["vessel"]["dice"] == 1.0


# ------------------------------------------------------------------------- 3. sparsify: undeclared label values


def test_sparsify_refuses_a_label_value_the_dataset_does_not_declare(tmp_path, no_verify):
    # The label files hold 0, 1 and 2, dataset.json declares 0 and 1: the new ignore value is 2, so every 2
    # would have silently become "unannotated".
    source = write_dense_dataset(tmp_path / "raw", labels={"background": 0, "membrane": 1})
    with pytest.raises(UserError, match="cell_000.nii.gz: label value 2 is not declared.*background=0, membrane=1"):
        sparsify.sparsify_dataset(source, tmp_path / "out", 101, every=2)
    assert listing(tmp_path / "out") is None and no_verify == []


# ------------------------------------------------------------------------- 4. NaN / inf images


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_fucci_refuses_non_finite_images(tmp_path, no_verify, bad):
    channels = np.ones((3, 4, 6, 6), np.float32)
    channels[1, 2, 3, 3] = bad
    image, label = tmp_path / "img.tif", tmp_path / "lab.tif"
    tifffile.imwrite(image, channels, photometric="minisblack")
    write_tif(label, np.zeros((4, 6, 6), np.uint16))
    with pytest.raises(UserError, match="img.tif: contains NaN or infinite values"):
        fucci.convert([(image, label)], tmp_path / "raw", 42, (1, 1, 1))
    assert listing(tmp_path / "raw") is None and no_verify == []


def _hdf5(path, array):
    import h5py

    with h5py.File(path, "w") as f:
        f["stack"] = array


# (SimpleITK's NIfTI reader returns NaN and inf as 0, so a NIfTI volume cannot carry them.)
@pytest.mark.parametrize("name, write", [("v.tif", lambda p, a: write_tif(p, a)), ("v.h5", _hdf5)])
def test_every_volume_reader_refuses_non_finite_values(tmp_path, name, write):
    volume = np.zeros((3, 4, 5), np.float64)
    volume[2, 3, 4] = np.nan
    write(tmp_path / name, volume)
    with pytest.raises(UserError, match="contains NaN or infinite values"):
        readers.read_volume(tmp_path / name, key="stack")


def test_slice_reader_refuses_non_finite_values(tmp_path):
    tifffile.imwrite(tmp_path / "s_1.tif", np.array([[0.0, np.inf]], np.float32))
    with pytest.raises(UserError, match="s_1.tif: contains NaN or infinite values"):
        readers.read_slice(tmp_path / "s_1.tif")


# ------------------------------------------------------------------------- 5. dataset id in another nnU-Net folder


@pytest.mark.parametrize("where", ["nnUNet_preprocessed", "nnUNet_results"])
def test_dataset_id_taken_in_an_exported_nnunet_folder(tmp_path, monkeypatch, where):
    for var in NNUNET_FOLDERS:
        monkeypatch.setenv(var, str(tmp_path / "data" / var))  # their own folders, not named after the variable
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    (tmp_path / "data" / where / "Dataset005_Old").mkdir(parents=True)
    with pytest.raises(UserError, match=f"{where}/Dataset005_Old already exists: pick another dataset id"):
        write_synthetic_dataset(tmp_path / "raw", 5, **TINY_SYNTH)
    assert listing(tmp_path / "raw") is None


@pytest.mark.parametrize("where", ["nnUNet_preprocessed", "nnUNet_results"])
def test_dataset_id_taken_beside_a_raw_folder_named_nnunet_raw(tmp_path, no_nnunet_folders, where):
    (tmp_path / where / "Dataset005_Old").mkdir(parents=True)
    with pytest.raises(UserError, match=f"{where}/Dataset005_Old already exists"):
        write_synthetic_dataset(tmp_path / "nnUNet_raw", 5, **TINY_SYNTH)
    assert listing(tmp_path / "nnUNet_raw") is None


def test_unrelated_raw_folder_ignores_the_exported_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    (tmp_path / "pre" / "Dataset005_Old").mkdir(parents=True)
    folder = write_synthetic_dataset(tmp_path / "elsewhere", 5, **TINY_SYNTH)
    assert folder.name == "Dataset005_SynthMicroscopy"


# ------------------------------------------------------------------------- 6. plans identifiers


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    folder = tmp_path / "pre" / "Dataset042_Hand"
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(stock_plans()))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    return folder


@pytest.mark.parametrize("command", [["plans", "tiny"], ["plans", "attention"]])
@pytest.mark.parametrize("name", ["../../escaped", "sub/x", ""])
def test_plans_identifier_must_be_a_plain_name(tmp_path, preprocessed, capsys, command, name):
    assert cli.main([*command, "-d", "42", "-o", name]) == 2
    assert f"invalid plans identifier {name!r} for -o" in one_line(capsys)
    assert listing(preprocessed) == ["nnUNetPlans.json"] and listing(tmp_path) == ["pre"]


def test_plans_source_identifier_must_be_a_plain_name(preprocessed):
    with pytest.raises(UserError, match="invalid plans identifier '../nnUNetPlans' for -p"):
        derive_attention_plans(42, source="../nnUNetPlans")


@pytest.mark.parametrize("text, fragment", [
    (json.dumps(stock_plans())[:200], "not valid JSON"),  # truncated
    (json.dumps({"plans_name": "nnUNetPlans"}), "incomplete plans (no 'configurations' mapping)"),
    (json.dumps({"configurations": {"3d_fullres": {"patch_size": [8, 8, 8]}}}), "incomplete plans (no key "
                                                                                "'architecture')"),
])
def test_plans_tiny_refuses_a_damaged_plans_file(preprocessed, capsys, text, fragment):
    (preprocessed / "nnUNetPlans.json").write_text(text)
    assert cli.main(["plans", "tiny", "-d", "42"]) == 2
    line = one_line(capsys)
    assert "nnUNetPlans.json: " in line and fragment in line and "nnUNetv2_plan_and_preprocess" in line
    assert listing(preprocessed) == ["nnUNetPlans.json"]


def test_pseudolabels_refuses_a_truncated_plans_file(preprocessed):
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps(stock_plans())[:300])
    with pytest.raises(UserError, match="nnUNetPlans.json: not valid JSON"):
        create_pseudolabels(42, fold="all", device="cpu")


def test_pseudolabels_refuses_a_preprocessed_folder_without_dataset_json(preprocessed):
    with pytest.raises(UserError, match="Dataset042_Hand has no dataset.json: rerun `nnUNetv2_plan_and_preprocess"):
        create_pseudolabels(42, fold="all", device="cpu")


# ------------------------------------------------------------------------- 8. NIfTI files truncated without an error


def test_nifti_truncated_without_an_error_is_refused(tmp_path, monkeypatch):
    real_write = sitk.WriteImage

    def truncating_write(image, path, *args, **kwargs):
        # What SimpleITK does on a full disk: a cut-off .nii.gz and no exception.
        real_write(image, path, *args, **kwargs)
        os.truncate(path, os.path.getsize(path) // 2)

    monkeypatch.setattr(sitk, "WriteImage", truncating_write)
    with pytest.raises(UserError, match="_0000.nii.gz was written incomplete .*free space"):
        write_synthetic_dataset(tmp_path / "raw", 5, **TINY_SYNTH)
    assert listing(tmp_path / "raw") is None


def test_complete_nifti_files_pass_the_check(tmp_path):
    for dtype in (np.uint8, np.int16, np.float32, np.float64):
        path = write_image(np.arange(60).reshape(3, 4, 5).astype(dtype), tmp_path / f"v_{np.dtype(dtype)}", (1, 2, 3))
        assert nifti_is_complete(path)
    path.write_bytes(path.read_bytes()[:-1])  # one byte short
    assert not nifti_is_complete(path)


# ------------------------------------------------------------------------- tracebacks -> one line


@pytest.mark.parametrize("code, fragment", [
    (errno.ENOSPC, "No space left on device; the disk is full"),
    (errno.EACCES, "Permission denied; no permission to write there"),
    (errno.EROFS, "Read-only file system; the file system is read-only"),
])
def test_os_error_while_writing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, code, fragment):
    def failing_write(array, stem, *args, **kwargs):
        raise OSError(code, os.strerror(code), f"{stem}_0000.nii.gz")

    monkeypatch.setattr(synth, "write_image", failing_write)
    assert cli.main(["synth", "-d", "5", "--out", str(tmp_path / "raw"), *TINY_SYNTH_ARGS]) == 2
    line = one_line(capsys)
    assert "imagesTr/synthmicroscopy_000_0000.nii.gz: " in line and fragment in line
    assert listing(tmp_path) == []


def test_full_disk_during_a_tiff_conversion(tmp_path, monkeypatch, capsys, no_verify):
    image, label = tmp_path / "img.tif", tmp_path / "lab.tif"
    tifffile.imwrite(image, np.ones((3, 4, 6, 6), np.uint16), photometric="minisblack")
    write_tif(label, np.zeros((4, 6, 6), np.uint16))

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(raw_dataset.tifffile, "imwrite", full_disk)
    assert cli.main(["convert", "fucci", "-d", "42", "--out", str(tmp_path / "raw"), "--format", "tif",
                     "--case", str(image), str(label), "--spacing", "1", "1", "1"]) == 2
    assert "fucci_000_0000.tif: No space left on device; the disk is full" in one_line(capsys)
    assert listing(tmp_path / "raw") is None


@pytest.mark.parametrize("command", [
    ["synth", "-d", "5", *TINY_SYNTH_ARGS],
    ["convert", "fucci", "-d", "42", "--case", "img.tif", "lab.tif", "--spacing", "1", "1", "1"],
])
def test_output_folder_below_a_regular_file(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    tifffile.imwrite("img.tif", np.ones((3, 4, 6, 6), np.uint16), photometric="minisblack")
    write_tif("lab.tif", np.zeros((4, 6, 6), np.uint16))
    assert cli.main([*command, "--out", "file/raw"]) == 2
    assert "file is not a folder but a file, so file/raw cannot be written: choose another --out" in one_line(capsys)
    assert listing(tmp_path) == ["file", "img.tif", "lab.tif"]


def test_evaluate_out_below_a_regular_file_and_on_a_full_disk(tmp_path, monkeypatch, capsys):
    labels = {"background": 0, "vessel": 1}
    truth = write_labels(tmp_path / "ds" / "labelsTs", {"a": np.ones((2, 2, 2), np.uint8)}, labels)
    pred = write_labels(tmp_path / "pred" / "p", {"a": np.ones((2, 2, 2), np.uint8)}, labels)
    (tmp_path / "file").write_text("")
    arguments = ["evaluate", "--pred", str(pred), "--gt", str(truth), "--no-topology"]
    assert cli.main([*arguments, "--out", str(tmp_path / "file" / "scores")]) == 2
    assert "is not a folder but a file" in one_line(capsys)

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    assert cli.main([*arguments, "--out", str(tmp_path / "scores")]) == 2
    assert "evaluation.json: No space left on device; the disk is full" in one_line(capsys)
    assert not any((tmp_path / "scores").iterdir())  # no partial file left behind


def test_replace_text_keeps_the_old_file_on_a_failed_write_and_names_it(tmp_path, monkeypatch):
    from nnunet_ext.errors import os_error_message, replace_text

    target = tmp_path / "result.json"
    replace_text(target, "old\n")
    replace_text(target, "new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["result.json"]

    def full_disk(self, *args, **kwargs):
        self.open("w").close()  # the partial file exists when the write fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(OSError) as info:
        replace_text(target, "newer\n")
    assert os_error_message(info.value).startswith(f"{target}: No space left on device; the disk is full")
    monkeypatch.undo()
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    with pytest.raises(OSError) as info:  # below a regular file: nothing can be created
        replace_text(target / "inner.json", "x")
    assert info.value.filename == str(target / "inner.json")


def corrupt_tiff(path, compression: str):
    """A compressed 4-slice stack whose first strip is overwritten with bytes no codec accepts."""
    write_tif(path, np.arange(4 * 32 * 32, dtype=np.uint16).reshape(4, 32, 32), compression=compression)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_corrupt_compressed_tiff_is_one_line(tmp_path, compression):
    with pytest.raises(UserError, match="stack.tif: cannot read this TIFF") as info:
        readers.read_tiff(corrupt_tiff(tmp_path / "stack.tif", compression))
    assert "\n" not in str(info.value)


def test_evaluate_with_a_corrupt_prediction(tmp_path):
    truth = write_labels(tmp_path / "ds" / "labelsTs", {"a": np.ones((4, 32, 32), np.uint8)},
                         {"background": 0, "vessel": 1})
    (tmp_path / "pred").mkdir()
    corrupt_tiff(tmp_path / "pred" / "a.tif", "zstd")
    with pytest.raises(UserError, match="a.tif: cannot read this TIFF"):
        evaluate_folder(tmp_path / "pred", truth, topology=False)


def test_synth_refuses_a_size_beyond_memory(tmp_path, capsys):
    # 10000^3 voxels x 64 bytes = 64,000 GB.
    assert cli.main(["synth", "-d", "5", "--out", str(tmp_path / "raw"), "--size", "10000", "10000", "10000"]) == 2
    line = one_line(capsys)
    assert "--size 10000 10000 10000 needs about 64,000 GB of memory per volume (64 bytes per voxel)" in line
    assert "choose a smaller --size" in line and listing(tmp_path) == []


# ------------------------------------------------------------------------- leftovers: SIGTERM and stale work folders


KILLED_SYNTH = """
import pathlib, sys, time
from nnunet_ext import cli
from nnunet_ext.datasets import synth

real_write = synth.write_image

def slow_write(*args, **kwargs):
    path = real_write(*args, **kwargs)
    pathlib.Path(sys.argv[1]).touch()  # a complete image is on disk: the test may send SIGTERM now
    time.sleep(120)
    return path

synth.write_image = slow_write
sys.exit(cli.main(["synth", "-d", "5", "--out", sys.argv[2], "--cases", "1", "--test-cases", "0",
                   "--size", "8", "16", "16"]))
"""


def test_sigterm_during_a_conversion_leaves_nothing(tmp_path):
    ready, raw = tmp_path / "ready", tmp_path / "raw"
    raw.mkdir()
    process = subprocess.Popen([sys.executable, "-c", KILLED_SYNTH, str(ready), str(raw)], stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), process.stderr.read() if process.poll() is not None else "no image written in 120 s"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1] == "nnunet-ext: error: terminated (SIGTERM); unfinished output was removed"
    assert listing(raw) == []


def test_forked_children_get_the_default_sigterm_back():
    # multiprocessing's fork pools (nnU-Net's file listing in its integrity check) stop their workers with
    # SIGTERM; a worker that inherited the raising handler could miss it while blocked on a lock and hang.
    with sigterm_raises():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        pid = os.fork()
        if pid == 0:
            os._exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def finished_pid() -> int:
    """The pid of a process that has already ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_next_run_removes_stale_work_folders_of_its_own_naming(tmp_path, capsys):
    raw, host, dead = tmp_path / "raw", socket.gethostname(), finished_pid()
    stale = raw / f".Dataset004_Old.tmp-{host}-{dead}-0123abcd"
    (stale / "imagesTr").mkdir(parents=True)
    (stale / "imagesTr" / "old_000_0000.nii.gz").write_bytes(b"complete image")
    kept = [raw / f".Dataset004_Old.tmp-{host}-{os.getpid()}-0123abce",  # its process runs: maybe still writing
            raw / f".Dataset004_Old.tmp-otherhost-{dead}-0123abcf",  # another machine's: cannot be checked here
            raw / ".Dataset004_Old.tmp-0123abd0",  # the naming before pids were recorded
            raw / ".hidden-notes"]  # not ours
    for folder in kept:
        folder.mkdir()
    write_synthetic_dataset(raw, 5, **TINY_SYNTH)
    assert listing(raw) == sorted(["Dataset005_SynthMicroscopy", *(p.name for p in kept)])
    assert f"nnunet-ext: removed {stale}, an unfinished dataset of process {dead}, which no longer runs" in (
        capsys.readouterr().err)
