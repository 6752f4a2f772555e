import gzip
import pickle
import struct
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from guidance_tune.config import GENERATED_DATASETS, ConfigError, DataConfig
from guidance_tune.data.files import require_data_files
from guidance_tune.data.readers import read_idx
from guidance_tune.data.splits import (
    DataSplits,
    Share,
    load_data,
    random_crop_flip,
    sample_batch,
    split_indices,
)

CPU = torch.device("cpu")
REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _load(**fields) -> DataSplits:
    return load_data(DataConfig(**fields), CPU)


def _all_batches(source, batch_size=64, epoch=0, seed=0, shuffle=False, drop_last=False):
    batches = list(
        source.batches(batch_size, epoch=epoch, seed=seed, shuffle=shuffle, drop_last=drop_last)
    )
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_mnist(root: Path, n_train: int = 30, n_test: int = 12) -> None:
    rng = np.random.default_rng(0)
    for prefix, n, label_offset in (("train", n_train, 0), ("t10k", n_test, 5)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) + label_offset) % 10)


def _write_cifar(root: Path, name: str, n_per_file: int = 20) -> None:
    """Tiny copies in torchvision's python-pickle layout, channels with different offsets."""
    rng = np.random.default_rng(1)
    offsets = np.repeat([20, 120, 200], 1024)
    folder, files, test, key, meta = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                    "labels", "batches.meta"),
        "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", "meta"),
    }[name]  # fmt: skip
    (root / folder).mkdir(parents=True)
    for i, file in enumerate([*files, test]):
        data = np.clip(offsets + rng.normal(0, 30, (n_per_file, 3072)), 0, 255).astype(np.uint8)
        entry = {"data": data, key: [(i + j) % 7 for j in range(n_per_file)]}
        (root / folder / file).write_bytes(pickle.dumps(entry))
    (root / folder / meta).write_bytes(pickle.dumps({"label_names": ["a", "b"]}))


def _image_keys(source) -> set[bytes]:
    images, _ = _all_batches(source)
    return {image.numpy().tobytes() for image in images}


def _assert_disjoint(splits: DataSplits) -> None:
    train, val, test = (_image_keys(s) for s in (splits.train, splits.val, splits.test))
    assert train and val and test
    assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)


@pytest.mark.parametrize("has_test_split", [True, False])
def test_split_is_seeded_disjoint_and_covers_the_training_set(has_test_split):
    config = DataConfig(val_fraction=0.25, test_fraction=0.2)
    index = split_indices(100, config, has_test_split=has_test_split)
    again = split_indices(100, config, has_test_split=has_test_split)
    other = split_indices(100, config.model_copy(update={"split_seed": 1}), has_test_split=True)
    parts = [index.train, index.val] + ([] if has_test_split else [index.test])
    assert [len(part) for part in parts] == ([75, 25] if has_test_split else [55, 25, 20])
    assert sorted(torch.cat(parts).tolist()) == list(range(100))  # disjoint and complete
    assert (index.test is None) == has_test_split
    assert torch.equal(index.train, again.train) and torch.equal(index.val, again.val)
    assert not torch.equal(index.val, other.val)


def test_n_train_keeps_a_seeded_subset_nested_in_larger_ones_with_the_same_val_and_test():
    small = split_indices(100, DataConfig(n_train=10), has_test_split=False)
    large = split_indices(100, DataConfig(n_train=40), has_test_split=False)
    assert len(small.train) == 10 and set(small.train.tolist()) <= set(large.train.tolist())
    assert torch.equal(small.val, large.val) and torch.equal(small.test, large.test)
    splits = _load(n_train=50, synthetic_samples=256)
    assert splits.train.num_samples == 50
    first, _ = _all_batches(splits.train)
    second, _ = _all_batches(_load(n_train=50, synthetic_samples=256).train)
    assert torch.equal(first, second)


def test_n_train_larger_than_the_training_part_is_a_config_error():
    with pytest.raises(ConfigError, match="data.n_train"):
        _load(n_train=1000, synthetic_samples=256)


def test_held_out_fractions_that_leave_no_training_data_are_a_config_error():
    with pytest.raises(ConfigError, match="data.val_fraction and data.test_fraction"):
        _load(name="digits", val_fraction=0.6, test_fraction=0.5)


def test_official_test_split_is_the_test_file_and_val_is_held_out_of_train(tmp_path):
    _write_fashion_mnist(tmp_path)
    splits = _load(name="fashion_mnist", root=tmp_path, val_fraction=0.2)
    sizes = [s.num_samples for s in (splits.train, splits.val, splits.test)]
    assert sizes == [24, 6, 12]
    _, test_labels = _all_batches(splits.test)
    assert test_labels.tolist() == [(i + 5) % 10 for i in range(12)]
    _assert_disjoint(splits)


def test_selecting_on_the_test_split_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="data.use_test_split is gone"):
        DataConfig(use_test_split=True)
    assert "use_test_split" not in DataConfig(use_test_split=False).model_dump()  # old records


def test_batches_of_an_epoch_are_identical_across_calls_so_resume_is_bitwise():
    first = _load(synthetic_samples=256, augment=True).train
    second = _load(synthetic_samples=256, augment=True).train
    kwargs = {"batch_size": 32, "seed": 3, "shuffle": True, "drop_last": True}
    for (x1, y1), (x2, y2) in zip(
        first.batches(epoch=2, **kwargs), second.batches(epoch=2, **kwargs), strict=True
    ):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    epoch_2 = next(first.batches(epoch=2, **kwargs))[1]
    epoch_3 = next(first.batches(epoch=3, **kwargs))[1]
    assert not torch.equal(epoch_2, epoch_3)


@pytest.mark.parametrize("drop_last", [True, False])
def test_num_batches_agrees_with_the_batches_yielded(drop_last):
    source = _load(synthetic_samples=100, val_fraction=0.1).train  # 90 samples
    batches = list(source.batches(32, epoch=0, seed=0, shuffle=True, drop_last=drop_last))
    assert len(batches) == source.num_batches(32, drop_last=drop_last) == (2 if drop_last else 3)
    sizes = [len(y) for _, y in batches]
    assert sizes == ([32, 32] if drop_last else [32, 32, 26])
    assert all(x.shape[0] == len(y) and x.dtype == torch.float32 for x, y in batches)
    assert all(y.dtype == torch.int64 for _, y in batches)


def test_a_shuffled_epoch_visits_every_sample_once():
    source = _load(synthetic_samples=100).train
    shuffled, _ = _all_batches(source, shuffle=True)
    ordered, _ = _all_batches(source)
    assert not torch.equal(shuffled, ordered)
    assert torch.allclose(shuffled.sum(0), ordered.sum(0), atol=1e-4)


def test_normalised_train_data_has_zero_mean_unit_std_per_channel(tmp_path):
    _write_cifar(tmp_path, "cifar10")
    splits = _load(name="cifar10", root=tmp_path)
    images, _ = _all_batches(splits.train)
    assert images.shape[1:] == (3, 32, 32)
    std, mean = torch.std_mean(images, dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4)
    assert torch.allclose(std, torch.ones(3), atol=1e-3)


def test_augmentation_keeps_shapes_and_is_deterministic_for_seed_and_epoch():
    plain = _load(synthetic_samples=128).train
    augmented = _load(synthetic_samples=128, augment=True).train
    x_plain, y_plain = _all_batches(plain)
    x_first, y_first = _all_batches(augmented, seed=1, epoch=4)
    x_again, _ = _all_batches(augmented, seed=1, epoch=4)
    x_other, _ = _all_batches(augmented, seed=1, epoch=5)
    assert x_first.shape == x_plain.shape and torch.equal(y_first, y_plain)
    assert torch.equal(x_first, x_again)
    assert not torch.equal(x_first, x_plain) and not torch.equal(x_first, x_other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_batches_on_the_gpu_match_those_on_the_cpu():
    config = DataConfig(synthetic_samples=256, augment=True, image_size=24)
    cpu, gpu = (load_data(config, torch.device(kind)).train for kind in ("cpu", "cuda"))
    x_cpu, y_cpu = _all_batches(cpu, shuffle=True, epoch=1)
    x_gpu, y_gpu = _all_batches(gpu, shuffle=True, epoch=1)
    assert x_gpu.is_cuda and torch.equal(y_cpu, y_gpu.cpu())
    assert torch.allclose(x_cpu, x_gpu.cpu(), atol=1e-4)


def test_batched_random_crop_matches_cropping_each_image_alone():
    images = torch.randn(6, 3, 10, 12)
    shifts = torch.tensor([[0, 0], [4, 4], [1, 3], [2, 0], [0, 4], [3, 2]])
    flips = torch.tensor([False, True, False, True, True, False])
    result = random_crop_flip(images, shifts, flips, padding=2)
    for image, (dy, dx), flip, out in zip(images, shifts.tolist(), flips, result, strict=True):
        padded = F.pad(image[None], (2, 2, 2, 2), mode="reflect")[0]
        crop = padded[:, dy : dy + 10, dx : dx + 12]
        assert torch.equal(out, crop.flip(-1) if flip else crop)


def test_image_size_resizes_batches_on_the_fly():
    splits = _load(name="digits", image_size=16)
    x, _ = next(splits.val.batches(8, epoch=0, seed=0, shuffle=False, drop_last=False))
    assert x.shape == (8, 1, 16, 16) and splits.image_size == 16


def test_sample_batch_returns_the_first_training_images_normalised():
    splits = _load(synthetic_samples=64)
    batch = sample_batch(splits, 5)
    first, _ = _all_batches(splits.train)
    assert torch.equal(batch, first[:5])


def test_synthetic_is_deterministic_for_a_seed_and_balanced():
    config = {"synthetic_samples": 1000, "synthetic_classes": 10, "val_fraction": 0.2}
    x1, y1 = _all_batches(_load(**config).train)
    x2, y2 = _all_batches(_load(**config).train)
    x3, _ = _all_batches(_load(**config, split_seed=1).train)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    counts = torch.bincount(y1, minlength=10)
    assert x1.shape == (800, 1, 32, 32) and counts.min() >= 60 and counts.max() <= 100


def test_synthetic_generation_of_4096_images_is_fast():
    import time

    start = time.perf_counter()
    _load()
    assert time.perf_counter() - start < 1.0


def test_synthetic_task_is_learnable_by_a_small_convnet():
    torch.manual_seed(0)
    splits = _load(synthetic_samples=1024, synthetic_size=16, val_fraction=0.25)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(17):  # 12 batches an epoch: about 200 steps
        for x, y in splits.train.batches(64, epoch=epoch, seed=0, shuffle=True, drop_last=True):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    x_val, y_val = _all_batches(splits.val)
    with torch.no_grad():
        accuracy = (net(x_val).argmax(1) == y_val).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


def test_digits_loads_1797_8x8_images_of_10_classes_in_three_splits():
    splits = _load(name="digits")
    sizes = [s.num_samples for s in (splits.train, splits.val, splits.test)]
    assert sizes == [1797 - 180 - 359, 180, 359] and sum(sizes) == 1797
    assert (splits.in_channels, splits.image_size, splits.num_classes) == (1, 8, 10)


def test_synthetic_splits_are_disjoint():
    _assert_disjoint(_load(synthetic_samples=256))


def test_idx_reader_round_trips_a_file(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (3, 4, 5)).astype(np.uint8)
    _write_idx(tmp_path / "x.gz", array)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), array)


def test_fashion_mnist_loads_the_idx_files_it_finds(tmp_path):
    _write_fashion_mnist(tmp_path)
    splits = _load(name="fashion_mnist", root=tmp_path)
    assert (splits.in_channels, splits.image_size, splits.num_classes) == (1, 28, 10)


def test_fashion_mnist_missing_root_is_a_config_error_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="data.root") as error:
        _load(name="fashion_mnist", root=tmp_path / "nowhere")
    assert "train-images-idx3-ubyte.gz" in str(error.value)
    assert "apt-get install dataset-fashion-mnist" in str(error.value)


@pytest.mark.skipif(
    not (REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_has_60000_training_images_of_28x28():
    splits = _load(name="fashion_mnist")
    sizes = [s.num_samples for s in (splits.train, splits.val, splits.test)]
    assert sizes == [54000, 6000, 10000]
    assert splits.image_size == 28 and splits.num_classes == 10


@pytest.mark.parametrize(
    ("name", "num_train", "num_classes"), [("cifar10", 100, 10), ("cifar100", 20, 100)]
)
def test_cifar_reads_torchvision_pickle_batches(tmp_path, name, num_train, num_classes):
    _write_cifar(tmp_path, name)
    splits = _load(name=name, root=tmp_path, val_fraction=0.2)
    sizes = [s.num_samples for s in (splits.train, splits.val, splits.test)]
    assert sizes == [num_train * 4 // 5, num_train // 5, 20]
    assert (splits.in_channels, splits.image_size, splits.num_classes) == (3, 32, num_classes)
    _assert_disjoint(splits)
    _, labels = _all_batches(splits.test)
    test_file_index = num_train // 20  # the writer labels file i with (i + j) % 7
    assert labels.tolist() == [(test_file_index + j) % 7 for j in range(20)]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_without_download_is_a_config_error(tmp_path, name):
    with pytest.raises(ConfigError, match="data.root") as error:
        _load(name=name, root=tmp_path)
    assert "data.download" in str(error.value)


def _write_imagefolder(root: Path) -> None:
    rng = np.random.default_rng(2)
    for split, per_class in (("train", 5), ("val", 2)):
        for label in ("cat", "dog", "fox"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_streams_tiny_pngs_deterministically(tmp_path):
    _write_imagefolder(tmp_path)
    splits = _load(name="imagefolder", root=tmp_path, image_size=8, augment=True, num_workers=0)
    sizes = [s.num_samples for s in (splits.train, splits.val, splits.test)]
    assert sizes == [13, 2, 6]  # val held out of train/, test is val/
    assert (splits.in_channels, splits.image_size, splits.num_classes) == (3, 8, 3)
    assert splits.train.num_batches(4, drop_last=True) == 3
    x, y = _all_batches(splits.train, batch_size=4, shuffle=True, drop_last=True, epoch=1)
    again, _ = _all_batches(splits.train, batch_size=4, shuffle=True, drop_last=True, epoch=1)
    assert x.shape == (12, 3, 8, 8) and y.dtype == torch.int64 and torch.equal(x, again)
    x_test, y_test = _all_batches(splits.test, batch_size=4)
    assert x_test.shape == (6, 3, 8, 8) and y_test.tolist() == [0, 0, 1, 1, 2, 2]
    assert set(splits.train.indices.tolist()).isdisjoint(splits.val.indices.tolist())


def test_imagefolder_augmentation_does_not_depend_on_worker_count(tmp_path):
    _write_imagefolder(tmp_path)
    config = {"name": "imagefolder", "root": tmp_path, "image_size": 8, "augment": True}
    in_process = _all_batches(_load(**config, num_workers=0).train, shuffle=True, epoch=2)
    with_workers = _all_batches(_load(**config, num_workers=2).train, shuffle=True, epoch=2)
    assert torch.equal(in_process[0], with_workers[0])


class _CountingFolder(torch.utils.data.Dataset):
    """An image folder that counts the images it decodes."""

    def __init__(self, folder):
        self.folder, self.samples, self.decoded = folder, folder.samples, 0

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, index):
        self.decoded += 1
        return self.folder[index]


def _replica_batches(source, share, drop_last, batch_size=4):
    return list(
        source.batches(batch_size, epoch=3, seed=1, shuffle=True, drop_last=drop_last, share=share)
    )


@pytest.mark.parametrize("kind", ["images_on_device", "imagefolder", "tokens"])
def test_each_replica_reads_only_its_rows_or_its_batches_of_the_whole_split(tmp_path, kind):
    if kind == "imagefolder":
        _write_imagefolder(tmp_path)
        fields = {"root": tmp_path, "image_size": 8, "num_workers": 0}
        source = _load(name="imagefolder", augment=True, **fields).train
        source.images.folder = counting = _CountingFolder(source.images.folder)
    elif kind == "images_on_device":
        source = _load(
            name="synthetic", synthetic_samples=40, synthetic_size=12, augment=True
        ).train
    else:
        source = _load(name="parity", n_train=40).train
    for drop_last in (True, False):
        whole = _replica_batches(source, Share(), drop_last)
        two = [_replica_batches(source, Share(r, 2, "batches"), drop_last) for r in (0, 1)]
        assert [len(t) for t in two] == [len(whole[0::2]), len(whole[1::2])]
        for r in (0, 1):  # whole batches r, r + 2, ...: the same tensors
            for (x, y), (x_whole, y_whole) in zip(two[r], whole[r::2], strict=True):
                assert torch.equal(x, x_whole) and torch.equal(y, y_whole)
    whole = _replica_batches(source, Share(), drop_last=True)
    if kind == "imagefolder":
        counting.decoded = 0
    rows = [_replica_batches(source, Share(r, 2, "rows"), drop_last=True) for r in (0, 1)]
    if kind == "imagefolder":  # each replica decoded its own rows, not the global batch
        assert counting.decoded == sum(len(y) for _, y in whole)
    for k, (x_whole, y_whole) in enumerate(whole):  # the rows side by side: batch k
        assert torch.equal(torch.cat([rows[0][k][0], rows[1][k][0]]), x_whole)
        assert torch.equal(torch.cat([rows[0][k][1], rows[1][k][1]]), y_whole)
    with pytest.raises(ValueError, match="does not split evenly over 3 replicas"):
        _replica_batches(source, Share(0, 3, "rows"), drop_last=True)


def test_imagefolder_missing_split_folder_is_a_config_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ConfigError, match="data.root"):
        _load(name="imagefolder", root=tmp_path)


DATASETS = typing.get_args(DataConfig.model_fields["name"].annotation)


@pytest.mark.parametrize("name", [n for n in DATASETS if n not in GENERATED_DATASETS])
def test_every_dataset_read_from_files_is_refused_on_an_empty_root_before_it_loads(tmp_path, name):
    # the check a study makes before it launches: the reader's own words, naming the field
    with pytest.raises(ConfigError, match="data.root") as before_loading:
        require_data_files(DataConfig(name=name, root=tmp_path))
    with pytest.raises(ConfigError) as loading:
        _load(name=name, root=tmp_path)
    assert str(loading.value) == str(before_loading.value)


@pytest.mark.parametrize("name", GENERATED_DATASETS)
def test_generated_datasets_need_no_files(tmp_path, name):
    require_data_files(DataConfig(name=name, root=tmp_path / "nowhere"))
