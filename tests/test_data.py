"""Dataset readers on small files written in each real format, plus the real Fashion-MNIST if installed."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_fmnist

from cawbench.config import DataConfig
from cawbench.data import DataError, iterate_batches, prepare_data, random_crop_flip, read_idx


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_mnist_like(folder: Path, n_train: int = 120, n_test: int = 40, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)), gz)
    write_idx(folder / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train), gz)
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test), gz)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_load_with_seeded_split(tmp_path, gz):
    write_mnist_like(tmp_path / "mnist", gz=gz)
    cfg = DataConfig(name="mnist", data_dir=str(tmp_path), val_size=20)
    data = prepare_data(cfg)
    assert data.info.num_classes == 10 and data.info.input_shape == (1, 28, 28)
    assert (len(data.train), len(data.val), len(data.test)) == (100, 20, 40)
    assert data.train.x.dtype == torch.uint8
    again = prepare_data(cfg)
    assert torch.equal(again.val.x, data.val.x)  # same split seed, same split
    other = prepare_data(DataConfig(name="mnist", data_dir=str(tmp_path), val_size=20, split_seed=1))
    assert not torch.equal(other.val.y, data.val.y)


def test_torchvision_layout_is_found(tmp_path):
    write_mnist_like(tmp_path / "FashionMNIST" / "raw")
    data = prepare_data(DataConfig(name="fashion-mnist", data_dir=str(tmp_path), val_size=10))
    assert data.source.endswith("FashionMNIST/raw")


def test_truncated_idx_file_is_reported(tmp_path):
    write_mnist_like(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="corrupt or truncated: header says"):
        read_idx(path)
    with pytest.raises(DataError, match="train-images-idx3-ubyte: corrupt or truncated"):
        prepare_data(DataConfig(name="mnist", data_dir=str(tmp_path)))


def test_garbage_gzip_is_reported(tmp_path):
    write_mnist_like(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt or truncated"):
        prepare_data(DataConfig(name="mnist", data_dir=str(tmp_path)))


def test_missing_dataset_lists_paths_and_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DataError) as err:
        prepare_data(DataConfig(name="mnist", data_dir=str(tmp_path / "nowhere")))
    text = str(err.value)
    assert "could not find the mnist dataset" in text
    assert str(tmp_path / "nowhere") in text and str(tmp_path / "nowhere" / "MNIST" / "raw") in text
    assert "--data-dir" in text and "download" in text


def write_cifar(folder: Path, hundred: bool) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    key = "fine_labels" if hundred else "labels"
    k = 100 if hundred else 10
    names = ["train", "test"] if hundred else [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8), key: list(rng.integers(0, k, 12))}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)


@pytest.mark.parametrize("name, folder, classes, n_train", [
    ("cifar10", "cifar-10-batches-py", 10, 60), ("cifar100", "cifar-100-python", 100, 12)])  # fmt: skip
def test_cifar_pickle_batches_load(tmp_path, name, folder, classes, n_train):
    write_cifar(tmp_path / folder, hundred=name == "cifar100")
    data = prepare_data(DataConfig(name=name, data_dir=str(tmp_path), val_size=2))
    assert data.info.num_classes == classes and data.info.input_shape == (3, 32, 32)
    assert len(data.train) + len(data.val) == n_train and len(data.test) == 12


def test_corrupt_cifar_batch_is_reported(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", hundred=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04truncated")
    with pytest.raises(DataError, match="data_batch_3: cannot unpickle"):
        prepare_data(DataConfig(name="cifar10", data_dir=str(tmp_path)))


def write_tiny_imagenet(root: Path, wnids=("n01", "n02"), per_class: int = 3) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                folder / f"{wnid}_{i}.JPEG"
            )
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            root / "val/images" / f"v{i}.JPEG"
        )
        lines.append(f"v{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_folder_tree_loads(tmp_path):
    write_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    data = prepare_data(DataConfig(name="tiny-imagenet", data_dir=str(tmp_path), val_size=0.5))
    assert data.info.num_classes == 2 and data.info.input_shape == (3, 64, 64)
    assert len(data.train) == 3 and len(data.val) == 3 and len(data.test) == 4
    assert sorted(data.test.y.tolist()) == [0, 0, 1, 1]
    assert (tmp_path / "tiny-imagenet-200" / "cawbench-cache.pt").is_file()


def test_tiny_imagenet_unknown_label_is_reported(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    write_tiny_imagenet(root)
    (root / "val" / "val_annotations.txt").write_text("v0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="label 'n99' is not in wnids.txt"):
        prepare_data(DataConfig(name="tiny-imagenet", data_dir=str(tmp_path)))


def test_digits_and_synthetic_need_no_files():
    digits = prepare_data(DataConfig(name="digits"))
    assert digits.info.input_shape == (1, 8, 8) and len(digits.test) == 360
    synthetic = prepare_data(DataConfig(name="synthetic", subset=50))
    assert len(synthetic.train) == 50


def test_subsets_resize_and_normalisation():
    data = prepare_data(DataConfig(name="digits", subset=64, test_subset=30, image_size=32))
    assert len(data.train) == 64 and len(data.test) == 30 and data.info.image_size == 32
    x, y = next(iterate_batches(data.test, 30, data.transform, torch.device("cpu"), train=False))
    assert x.shape == (30, 1, 32, 32) and x.dtype == torch.float32
    full = prepare_data(DataConfig(name="digits"))
    xs = torch.cat(
        [b for b, _ in iterate_batches(full.train, 512, full.transform, torch.device("cpu"), train=False)]
    )
    assert abs(xs.mean().item()) < 0.05 and abs(xs.std().item() - 1) < 0.05


def test_training_order_depends_only_on_seed_and_epoch():
    data = prepare_data(DataConfig(name="digits"))

    def labels(seed, epoch):
        batches = iterate_batches(data.train, 100, data.transform, torch.device("cpu"), train=True, seed=seed,
                                  epoch=epoch)  # fmt: skip
        return torch.cat([y for _, y in batches])

    assert torch.equal(labels(0, 1), labels(0, 1))
    assert not torch.equal(labels(0, 1), labels(0, 2))
    assert not torch.equal(labels(0, 1), labels(1, 1))


def test_random_crop_flip_matches_a_direct_crop():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, 1, gen)
    assert out.shape == x.shape
    gen = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 3, (2,), generator=gen)
    dx = torch.randint(0, 3, (2,), generator=gen)
    flip = torch.rand(2, generator=gen) < 0.5
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        crop = padded[i, :, dy[i] : dy[i] + 4, dx[i] : dx[i] + 4]
        expected = crop.flip(-1) if flip[i] else crop
        assert torch.equal(out[i], expected)


def test_bad_validation_size_is_reported():
    with pytest.raises(DataError, match="leaves no training images"):
        prepare_data(DataConfig(name="digits", val_size=5000))


def test_labels_outside_the_classes_in_a_valid_idx_file_are_one_clear_error(tmp_path, capsys):
    from cawbench.cli import main

    write_mnist_like(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", np.array([3, 12, 7] * 40))  # label 12 of 10
    argv = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cawbench: error: ") and "Traceback" not in err
    assert "40 training label(s) of mnist are outside [0, 10) (e.g. [12]; first at index 1)" in err
    assert not (tmp_path / "out").exists()


def test_a_last_training_batch_of_one_joins_the_batch_before_it():
    from cawbench.data import BatchTransform, Split, batch_bounds

    assert batch_bounds(129, 128, train=True) == [(0, 129)]
    assert batch_bounds(257, 128, train=True) == [(0, 128), (128, 257)]
    assert batch_bounds(130, 128, train=True) == [(0, 128), (128, 130)]
    assert batch_bounds(129, 128, train=False) == [(0, 128), (128, 129)]  # evaluation: plain slices
    assert batch_bounds(1, 128, train=True) == [(0, 1)]
    split = Split(torch.zeros(21, 1, 2, 2, dtype=torch.uint8), torch.arange(21))
    transform = BatchTransform((0.0,), (1.0,), None, DataConfig(name="synthetic", augment="crop_flip"))
    batches = list(iterate_batches(split, 10, transform, torch.device("cpu"), train=True, seed=1))
    assert [len(y) for _, y in batches] == [10, 11]  # every image, each once, every epoch
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(21))


@needs_fmnist
def test_real_fashion_mnist_from_the_debian_package():
    data = prepare_data(DataConfig(name="fashion-mnist", image_size=32))
    assert data.source == "/usr/share/datasets/fashion-mnist"
    assert (len(data.train), len(data.val), len(data.test)) == (50_000, 10_000, 10_000)
    assert data.info.input_shape == (1, 32, 32)
    assert sorted(torch.bincount(data.test.y).tolist()) == [1000] * 10
    mean = data.train.x.float().mean().item() / 255
    assert abs(mean - 0.2860) < 0.003  # the normalisation constant the recipes use
