"""The CIFAR-10 reader on generated files in the standard layout, and its errors."""

import pickle

import numpy as np
import pytest

from conftest import make_cifar_images, run_in_process
from fasttrain.data.cifar import load_cifar10, write_cifar10_layout
from fasttrain.errors import UserError


def test_reads_every_train_batch_into_one_uint8_array(tiny_cifar_root):
    images, labels = load_cifar10(str(tiny_cifar_root), train=True)
    assert images.shape == (100, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (100,) and labels.dtype == np.int64
    first, first_labels = make_cifar_images(20, seed=0)  # data_batch_1 as written
    assert np.array_equal(images[:20], first) and np.array_equal(labels[:20], first_labels)
    test_images, _ = load_cifar10(str(tiny_cifar_root), train=False)
    assert test_images.shape == (30, 32, 32, 3)


def test_planes_are_decoded_as_red_green_blue(tmp_path):
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    image[0, 0, 1] = (10, 20, 30)  # row 0, column 1
    write_cifar10_layout(tmp_path / "cifar-10-batches-py", image, np.array([3]), "test_batch")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    assert (raw[1], raw[1024 + 1], raw[2048 + 1]) == (10, 20, 30)  # the standard layout: R, G, B planes
    images, labels = load_cifar10(str(tmp_path), train=False)
    assert tuple(images[0, 0, 1]) == (10, 20, 30) and labels[0] == 3


def test_truncated_file_is_reported_with_its_path(tiny_cifar_root):
    batch = tiny_cifar_root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    with pytest.raises(UserError, match=r"data_batch_3 is truncated or corrupt"):
        load_cifar10(str(tiny_cifar_root), train=True)


def test_file_with_wrong_content_is_reported(tiny_cifar_root):
    with open(tiny_cifar_root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(UserError, match=r"test_batch holds data of shape \(4, 100\)"):
        load_cifar10(str(tiny_cifar_root), train=False)


def test_missing_folder_says_where_it_looked_and_which_setting_to_change(tmp_path):
    with pytest.raises(UserError, match=r"looked for .*cifar-10-batches-py.*data.root"):
        load_cifar10(str(tmp_path / "nowhere"), train=True, download=False)


def test_cli_reports_a_corrupt_file_with_exit_2(tiny_cifar_root, tmp_path, capsys):
    (tiny_cifar_root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    result = run_in_process(capsys, "--config", "configs/smoke.yaml", "data.dataset=cifar10", f"data.root={tiny_cifar_root}",
                           f"output.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data_batch_1 is truncated or corrupt" in result.stderr


def test_cli_reports_missing_data_offline_with_exit_2(tmp_path, capsys):
    result = run_in_process(capsys, "--config", "configs/smoke.yaml", "data.dataset=cifar10", f"data.root={tmp_path}",
                           "data.download=false", f"output.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "CIFAR-10 not found" in result.stderr and "data.root" in result.stderr
