"""Where a file-backed dataset's files must be: one rule per dataset, used by its reader and by
the checks before a study launches.

A study whose files are missing on a local Ray would otherwise fail every trial, each after its
start-up and with the same traceback; one rule means the study is refused with the reader's own
words. Imports nothing heavy (no torch), so a driver can check before it builds anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guidance_tune.config import ConfigError, DataConfig

# The WikiText layout text_lm reads, by split.
TEXT_LM_FILES = {
    "train": "wiki.train.tokens",
    "val": "wiki.valid.tokens",
    "test": "wiki.test.tokens",
}


def fashion_mnist_files(root: Path) -> list[tuple[Path, Path]]:
    """(images, labels) of train, then of test."""
    return [
        (root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz")
        for prefix in ("train", "t10k")
    ]


@dataclass(frozen=True)
class CifarFiles:
    """torchvision's python batches: ``folder`` under ``data.root``."""

    folder: str
    train_files: tuple[str, ...]
    test_file: str

    def paths(self, root: Path) -> list[Path]:
        """The training batches, then the test batch."""
        return [root / self.folder / name for name in (*self.train_files, self.test_file)]


CIFAR_FILES = {
    "cifar10": CifarFiles(
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch"
    ),
    "cifar100": CifarFiles("cifar-100-python", ("train",), "test"),
}


def require_fashion_mnist(config: DataConfig) -> None:
    for path in (path for pair in fashion_mnist_files(config.root) for path in pair):
        if not path.is_file():
            raise ConfigError(
                f"data.root {config.root}: fashion_mnist file {path.name} not found; "
                "apt-get install dataset-fashion-mnist or set data.root"
            )


def require_cifar(config: DataConfig) -> None:
    """With ``data.download`` the reader fetches what is missing."""
    files = CIFAR_FILES[config.name]
    if not config.download and not all(path.is_file() for path in files.paths(config.root)):
        raise ConfigError(
            f"data.root {config.root}: {config.name} not found (expected {files.folder}/ with "
            "torchvision's python batches); set data.root or data.download: true"
        )


def require_imagefolder(config: DataConfig) -> None:
    if config.root is None:
        raise ConfigError("data.root must be set for imagefolder (a folder with train/ and val/)")
    for split in ("train", "val"):
        if not (config.root / split).is_dir():
            raise ConfigError(
                f"data.root {config.root}: imagefolder needs {config.root / split}/<class>/ images"
            )


def text_lm_paths(config: DataConfig) -> dict[str, Path]:
    """The three splits' files, each there."""
    if config.root is None:
        raise ConfigError(
            "data.root must be set for text_lm: a folder with wiki.train.tokens, "
            "wiki.valid.tokens and wiki.test.tokens (or use data.name: grammar_lm)"
        )
    paths = {split: config.root / name for split, name in TEXT_LM_FILES.items()}
    missing = [path.name for path in paths.values() if not path.is_file()]
    if missing:
        raise ConfigError(
            f"data.root {config.root}: text_lm needs {', '.join(missing)} (the WikiText layout); "
            "set data.root to the folder that holds them"
        )
    return paths


_RULES: dict[str, Callable[[DataConfig], object]] = {
    "fashion_mnist": require_fashion_mnist,
    "cifar10": require_cifar,
    "cifar100": require_cifar,
    "imagefolder": require_imagefolder,
    "text_lm": text_lm_paths,
}


def require_data_files(config: DataConfig) -> None:
    """Refuse, naming ``data.root`` and the fix, data whose files this machine lacks; data that
    is generated or shipped with a dependency always passes."""
    rule = _RULES.get(config.name)
    if rule is not None:
        rule(config)
