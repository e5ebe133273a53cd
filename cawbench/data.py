"""Dataset registry, file-format readers, splits, and on-device batching.

Every dataset loads as uint8 image tensors ``[N, C, H, W]`` plus int64 labels; normalisation, resizing and
augmentation happen per batch on the training device (no PIL, no worker processes), so small datasets stay
resident on the GPU. Files are looked for in ``--data-dir``/``$CAWBENCH_DATA``, then in known system
locations (Debian's ``dataset-fashion-mnist``), then downloaded with torchvision; when all fail the error
lists every path tried and how to get the data.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cawbench.config import DataConfig
from cawbench.registry import Registry
from cawbench.seeding import derive_seed, epoch_generator


class DataError(RuntimeError):
    """Missing, corrupt or inconsistent data; the message says what was tried and what to do."""


@dataclass(frozen=True)
class RawDataset:
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    default_val_size: float  # count, or fraction if < 1
    source: str  # where the files came from


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int  # after any resize (square images)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


Loader = Callable[[Path | None, DataConfig], RawDataset]
DATASETS: Registry[Loader] = Registry("dataset")
register_dataset = DATASETS.register


def list_datasets(filter: str = "*") -> list[str]:
    return DATASETS.names(filter)


NORMALISATIONS = {
    "half": ((0.5,), (0.5,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
SYSTEM_LOCATIONS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}


# --------------------------------------------------------------------------------- path resolution
def _explicit_root(data_dir: str | None) -> Path | None:
    root = data_dir or os.environ.get("CAWBENCH_DATA")
    return Path(root).expanduser() if root else None


def candidate_dirs(name: str, root: Path | None, subdirs: list[str]) -> list[Path]:
    """Folders to look in, most explicit first."""
    out: list[Path] = []
    if root is not None:
        out.append(root)
        out += [root / s for s in subdirs]
    out += SYSTEM_LOCATIONS.get(name, [])
    default_root = Path.home() / ".cache" / "cawbench" / "data"
    out += [default_root / s for s in subdirs]
    return list(dict.fromkeys(out))


def _missing(name: str, tried: list[Path], files: list[str], hint: str = "") -> DataError:
    lines = [f"could not find the {name} dataset. Looked for {', '.join(files)} in:"]
    lines += [f"  - {p}" for p in tried]
    lines.append(
        "Get it with --data-dir PATH (or CAWBENCH_DATA=PATH) pointing at a folder that holds the files"
        + (f"; {hint}" if hint else "")
        + "; or run where there is internet so torchvision can download it."
    )
    return DataError("\n".join(lines))


# --------------------------------------------------------------------------------- file formats
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or not, checking magic number and length."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc}); the file is corrupt or truncated") from None
    if len(data) < 4:
        raise DataError(f"{path}: file is truncated ({len(data)} bytes)")
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number {data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: file is truncated (header incomplete)")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(
            f"{path}: corrupt or truncated: header says {dims} = {expected} bytes, found {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find_idx_dir(dirs: list[Path]) -> tuple[Path, dict[str, Path]] | None:
    for d in dirs:
        found = {}
        for key, stem in IDX_FILES.items():
            for name in (stem + ".gz", stem):
                if (d / name).is_file():
                    found[key] = d / name
                    break
        if len(found) == len(IDX_FILES):
            return d, found
    return None


def load_idx_dataset(name: str, tv_folder: str, root: Path | None, mean: float, std: float) -> RawDataset:
    subdirs = [name, f"{tv_folder}/raw", tv_folder]
    dirs = candidate_dirs(name, root, subdirs)
    hit = _find_idx_dir(dirs)
    if hit is None:
        download_root = root or Path.home() / ".cache" / "cawbench" / "data"
        if _torchvision_download(tv_folder, download_root):
            hit = _find_idx_dir(candidate_dirs(name, download_root, subdirs))
    if hit is None:
        hint = "on Debian/Ubuntu `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
        raise _missing(name, dirs, [f + "[.gz]" for f in IDX_FILES.values()], hint)
    folder, files = hit
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        nx, ny = len(arrays[f"{split}_x"]), len(arrays[f"{split}_y"])
        if nx != ny:
            raise DataError(f"{folder}: {split} images ({nx}) and labels ({ny}) differ in number")
    return RawDataset(
        train_x=torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=10,
        mean=(mean,),
        std=(std,),
        default_val_size=10_000,
        source=str(folder),
    )


def _torchvision_download(tv_folder: str, root: Path) -> bool:
    """Try torchvision's download; False (quietly) when there is no internet."""
    import torchvision.datasets as tvd

    cls = {
        "MNIST": tvd.MNIST,
        "FashionMNIST": tvd.FashionMNIST,
        "cifar-10-batches-py": tvd.CIFAR10,
        "cifar-100-python": tvd.CIFAR100,
    }.get(tv_folder)
    if cls is None or os.environ.get("CAWBENCH_NO_DOWNLOAD"):
        return False
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
        return True
    except Exception:  # no network, refused, partial: report the paths tried instead
        return False


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise DataError(f"{path}: cannot unpickle ({exc}); the file is corrupt or truncated") from None


def _cifar_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or label_key not in batch:
        raise DataError(
            f"{path}: not a CIFAR batch (keys {sorted(batch)[:6]}, expected data and {label_key})"
        )
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: corrupt CIFAR batch: data {data.shape}, labels {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, root: Path | None) -> RawDataset:
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    test_files = ["test_batch"] if name == "cifar10" else ["test"]
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def find(dirs: list[Path]) -> Path | None:
        return next((d for d in dirs if all((d / f).is_file() for f in train_files + test_files)), None)

    dirs = candidate_dirs(name, root, [folder, f"{name}/{folder}"])
    hit = find(dirs)
    if hit is None:
        download_root = root or Path.home() / ".cache" / "cawbench" / "data"
        if _torchvision_download(folder, download_root):
            hit = find(candidate_dirs(name, download_root, [folder]))
    if hit is None:
        raise _missing(
            name, dirs, train_files + test_files, f"the python-pickle batches from the {folder} archive"
        )
    tr = [_cifar_arrays(hit / f, label_key) for f in train_files]
    te = [_cifar_arrays(hit / f, label_key) for f in test_files]
    return RawDataset(
        train_x=torch.from_numpy(np.concatenate([a for a, _ in tr])),
        train_y=torch.from_numpy(np.concatenate([b for _, b in tr])),
        test_x=torch.from_numpy(np.concatenate([a for a, _ in te])),
        test_y=torch.from_numpy(np.concatenate([b for _, b in te])),
        num_classes=10 if name == "cifar10" else 100,
        mean=(0.4914, 0.4822, 0.4465),  # the DeeperForward/CAW-Conv constants (used for CIFAR-100 too)
        std=(0.2023, 0.1994, 0.2010),
        default_val_size=5_000,
        source=str(hit),
    )


def _read_rgb(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc}); the file is corrupt or truncated") from None
    if arr.shape[:2] != (size, size):
        raise DataError(f"{path}: expected a {size}x{size} image, got {arr.shape[1]}x{arr.shape[0]}")
    return arr.transpose(2, 0, 1)


def load_tiny_imagenet(root: Path | None) -> RawDataset:
    dirs = candidate_dirs("tiny-imagenet", root, ["tiny-imagenet-200", "tiny-imagenet"])
    hit = next((d for d in dirs if (d / "wnids.txt").is_file() and (d / "train").is_dir()), None)
    if hit is None:
        raise _missing(
            "tiny-imagenet",
            dirs,
            ["wnids.txt", "train/<wnid>/images/*.JPEG", "val/images", "val/val_annotations.txt"],
            "unzip tiny-imagenet-200.zip (no automatic download)",
        )
    cache = hit / "cawbench-cache.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
    else:
        wnids = [w.strip() for w in (hit / "wnids.txt").read_text().split() if w.strip()]
        index = {w: i for i, w in enumerate(wnids)}
        train_x, train_y = [], []
        for wnid in wnids:
            folder = hit / "train" / wnid / "images"
            if not folder.is_dir():
                raise DataError(f"{hit}: class {wnid} listed in wnids.txt has no folder {folder}")
            for img in sorted(folder.iterdir()):
                train_x.append(_read_rgb(img, 64))
                train_y.append(index[wnid])
        ann = hit / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DataError(f"{hit}: missing {ann} (the validation labels)")
        test_x, test_y = [], []
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in index:
                raise DataError(f"{ann}: label {parts[1]!r} is not in wnids.txt")
            test_x.append(_read_rgb(hit / "val" / "images" / parts[0], 64))
            test_y.append(index[parts[1]])
        blob = {
            "train_x": torch.from_numpy(np.stack(train_x)),
            "train_y": torch.tensor(train_y, dtype=torch.int64),
            "test_x": torch.from_numpy(np.stack(test_x)),
            "test_y": torch.tensor(test_y, dtype=torch.int64),
            "num_classes": len(wnids),
        }
        try:  # decoding 110k JPEGs is slow: keep a tensor cache beside the data when we may write there
            torch.save(blob, str(cache) + ".tmp")
            os.replace(str(cache) + ".tmp", cache)
        except OSError:
            pass
    return RawDataset(
        train_x=blob["train_x"],
        train_y=blob["train_y"],
        test_x=blob["test_x"],
        test_y=blob["test_y"],
        num_classes=int(blob["num_classes"]),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        default_val_size=0.1,
        source=str(hit),
    )


# --------------------------------------------------------------------------------- registered datasets
@register_dataset("mnist")
def _mnist(root: Path | None, cfg: DataConfig) -> RawDataset:
    return load_idx_dataset("mnist", "MNIST", root, 0.1307, 0.3081)


@register_dataset("fashion-mnist")
def _fashion_mnist(root: Path | None, cfg: DataConfig) -> RawDataset:
    return load_idx_dataset("fashion-mnist", "FashionMNIST", root, 0.2860, 0.3530)


@register_dataset("cifar10")
def _cifar10(root: Path | None, cfg: DataConfig) -> RawDataset:
    return load_cifar("cifar10", root)


@register_dataset("cifar100")
def _cifar100(root: Path | None, cfg: DataConfig) -> RawDataset:
    return load_cifar("cifar100", root)


@register_dataset("tiny-imagenet")
def _tiny_imagenet(root: Path | None, cfg: DataConfig) -> RawDataset:
    return load_tiny_imagenet(root)


@register_dataset("digits")
def _digits(root: Path | None, cfg: DataConfig) -> RawDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download); a fixed 360-image test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(derive_seed("digits-test-split") % 2**32).permutation(len(labels))
    test, train = order[:360], order[360:]
    x = torch.from_numpy(images)
    mean = float(images.mean() / 255.0)
    std = float(images.std() / 255.0)
    return RawDataset(
        x[train], torch.from_numpy(labels[train]), x[test], torch.from_numpy(labels[test]),
        num_classes=10, mean=(mean,), std=(std,), default_val_size=200, source="sklearn.datasets.load_digits",
    )  # fmt: skip


@register_dataset("synthetic")
def _synthetic(root: Path | None, cfg: DataConfig) -> RawDataset:
    """Ten noisy class prototypes, 1x16x16, seeded: learnable in seconds, for fast tests."""
    rng = np.random.default_rng(12345)
    k, size = 10, 16
    prototypes = rng.uniform(0, 255, size=(k, 1, size, size))

    def draw(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = np.random.default_rng(seed)
        y = r.integers(0, k, size=n)
        x = prototypes[y] * 0.6 + r.uniform(0, 255, size=(n, 1, size, size)) * 0.4
        return torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y.astype(np.int64))

    trx, try_ = draw(1200, 1)
    tex, tey = draw(400, 2)
    return RawDataset(trx, try_, tex, tey, 10, (0.5,), (0.25,), 200, "synthetic")


# --------------------------------------------------------------------------------- splits and batches
@dataclass
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W] (on the training device when resident)
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class PreparedData:
    info: DataInfo
    train: Split
    val: Split
    test: Split
    transform: BatchTransform
    source: str


class BatchTransform:
    """uint8 batch -> normalised float batch on the device: scale, normalise, resize, augment."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int | None, cfg: DataConfig):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.size = size
        self.augment = cfg.augment
        self.padding = cfg.crop_padding
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std on ``device``, copied there once (not once per batch)."""
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]

    def __call__(
        self,
        x: torch.Tensor,
        train: bool,
        gen: torch.Generator | None = None,
        crop: CropDraws | None = None,
    ) -> torch.Tensor:
        """``crop``: this batch's pre-drawn crop/flip parameters (else drawn here from ``gen``)."""
        mean, std = self._stats(x.device)
        x = x.float().div_(255.0)
        x = (x - mean) / std
        if self.size is not None and x.shape[-1] != self.size:
            # Normalise-then-resize, as the authors' (F)MNIST pipelines do (bilinear; the two commute).
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if train and self.augment == "crop_flip":
            x = random_crop_flip(x, self.padding, gen, crop)
        return x


CropDraws = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # dy, dx (int64) and flip (bool), one per image


def draw_crop_flip(n: int, padding: int, gen: torch.Generator | None) -> CropDraws:
    """The random crop offsets and flips of ``n`` images, in the order :func:`random_crop_flip` draws them."""
    draw_device = gen.device if gen is not None else torch.device("cpu")
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=draw_device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=draw_device)
    flip = torch.rand(n, generator=gen, device=draw_device) < 0.5
    return dy, dx, flip


def random_crop_flip(
    x: torch.Tensor, padding: int, gen: torch.Generator | None, draws: CropDraws | None = None
) -> torch.Tensor:
    """RandomCrop(size, padding) + RandomHorizontalFlip, per sample, vectorised on the device."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy, dx, flip = (t.to(x.device) for t in (draws or draw_crop_flip(n, padding, gen)))
    rows = dy[:, None] + torch.arange(h, device=x.device)[None]  # [n, h]
    cols = dx[:, None] + torch.arange(w, device=x.device)[None]  # [n, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    wide = padded.shape[-1]
    out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, wide))
    return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def check_labels(raw: RawDataset, name: str) -> None:
    """Every label must be a class index in [0, K): a file with others is not this dataset (or is corrupt),
    and would otherwise fail deep inside a loss function."""
    k = raw.num_classes
    for split, labels in (("training", raw.train_y), ("test", raw.test_y)):
        bad = (labels < 0) | (labels >= k)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            values = sorted({int(v) for v in labels[bad][:1000].tolist()})[:5]
            raise DataError(
                f"{raw.source}: {int(bad.sum())} {split} label(s) of {name} are outside [0, {k}) (e.g. "
                f"{values}; first at index {first}); the label file is corrupt or belongs to another dataset"
            )


def _split_size(val_size: float, n: int) -> int:
    size = int(round(val_size * n)) if 0 < val_size < 1 else int(val_size)
    if not 0 <= size < n:
        raise DataError(f"data.val_size={val_size} leaves no training images (train has {n})")
    return size


def prepare_data(cfg: DataConfig, device: torch.device | str = "cpu") -> PreparedData:
    """Load, split (seeded) and subset a dataset; move it to ``device`` when it is to stay resident."""
    loader = DATASETS.get(cfg.name)
    raw = loader(_explicit_root(cfg.data_dir), cfg)
    check_labels(raw, cfg.name)
    n = len(raw.train_y)
    n_val = _split_size(cfg.val_size if cfg.val_size is not None else raw.default_val_size, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if cfg.subset is not None:
        train_idx = train_idx[: cfg.subset]
    if len(train_idx) < 2:
        raise DataError(
            f"{len(train_idx)} training image(s) left (data.subset={cfg.subset}, {n_val} of {n} held out for "
            "validation); training needs at least 2 (BatchNorm normalises over a batch): raise data.subset"
        )
    if cfg.val_subset is not None:
        val_idx = val_idx[: cfg.val_subset]
    test_x, test_y = raw.test_x, raw.test_y
    if cfg.test_subset is not None:
        test_x, test_y = test_x[: cfg.test_subset], test_y[: cfg.test_subset]

    if cfg.normalization == "dataset":
        mean, std = raw.mean, raw.std
    elif cfg.normalization == "none":
        mean, std = (0.0,), (1.0,)
    else:
        mean, std = NORMALISATIONS[cfg.normalization]
    channels = raw.train_x.shape[1]
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels:
        raise DataError(f"normalization {cfg.normalization!r} has {len(mean)} channels, data has {channels}")

    target = torch.device(device) if cfg.device_resident else torch.device("cpu")

    def split(x: torch.Tensor, y: torch.Tensor) -> Split:
        return Split(x.contiguous().to(target), y.to(target))

    size = cfg.image_size or raw.train_x.shape[-1]
    info = DataInfo(cfg.name, raw.num_classes, channels, size)
    return PreparedData(
        info=info,
        train=split(raw.train_x[train_idx], raw.train_y[train_idx]),
        val=split(raw.train_x[val_idx], raw.train_y[val_idx]),
        test=split(test_x, test_y),
        transform=BatchTransform(mean, std, cfg.image_size, cfg),
        source=raw.source,
    )


def batch_bounds(n: int, batch_size: int, train: bool) -> list[tuple[int, int]]:
    """(start, stop) of each batch. In training, a last batch of a single image is merged into the batch
    before it (one batch of ``batch_size + 1``): BatchNorm cannot normalise one image, and dropping it would
    lose an image every epoch. Deterministic and the same for every method; evaluation batches are plain
    slices of ``batch_size``."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if train and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def iterate_batches(
    split: Split,
    batch_size: int,
    transform: BatchTransform,
    device: torch.device,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) on ``device``. Training order and augmentation depend only on (seed, epoch); batches
    follow :func:`batch_bounds` (a last training batch of one image joins the one before it).

    The epoch's order (and its crop/flip draws) are drawn on the CPU, as always, and moved to the data's
    device once per epoch; evaluation batches are plain slices. So a resident dataset costs no host to
    device transfer per batch."""
    n = len(split)
    where = split.x.device
    order = None
    crops: CropDraws | None = None
    bounds = batch_bounds(n, batch_size, train)
    if train:
        order = torch.randperm(n, generator=epoch_generator(seed, epoch, "cpu")).to(where)
        if transform.augment == "crop_flip":
            aug_gen = epoch_generator(seed + 1, epoch, "cpu")
            per_batch = [draw_crop_flip(stop - start, transform.padding, aug_gen) for start, stop in bounds]
            crops = tuple(torch.cat([b[k] for b in per_batch]).to(device) for k in range(3))  # type: ignore[assignment]
    for start, stop in bounds:
        if order is None:
            x, y = split.x[start:stop], split.y[start:stop]
        else:
            idx = order[start:stop]
            x, y = split.x.index_select(0, idx), split.y.index_select(0, idx)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        crop = None if crops is None else (crops[0][start:stop], crops[1][start:stop], crops[2][start:stop])
        yield transform(x, train, None, crop), y
