"""Tests for kdpipe.data: sources, splits, fingerprints, normalisation, loaders."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdpipe import data, sources
from kdpipe.config import DataConfig
from kdpipe.data import DataError, DatasetSpec, build_dataset_spec, get_split, make_loader


def _folder(root: Path, classes: dict[str, str], n: int = 12, size: tuple[int, int] = (12, 10),
            seed: int = 0) -> Path:
    """Write ``n`` random PNGs per class; ``classes`` maps class name -> PIL mode."""
    rng = np.random.RandomState(seed)
    for name, mode in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            shape = (size[1], size[0]) + (() if mode == "L" else (3,))
            Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8), mode).save(
                root / name / f"{i:03d}.png")
    return root


def _folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source=f"imagefolder:{root}", image_size=8, **kw)


def _labels_of(ds: data.SplitDataset) -> np.ndarray:
    return ds.source.labels[ds.source_positions]


# ------------------------------------------------------------------ bundled sources
@pytest.mark.parametrize("source, shape, n", [("digits", (1, 8, 8), 1797),
                                              ("mnist5k", (1, 28, 28), 5000)])
def test_bundled_sources_shapes_classes_and_split_sizes(source, shape, n):
    spec = build_dataset_spec(DataConfig(source=source))
    assert spec.input_shape == shape
    assert spec.classes == [str(c) for c in range(10)]
    assert sum(spec.split_sizes.values()) == n
    assert spec.split_sizes["test"] == pytest.approx(0.2 * n, abs=1)
    assert spec.split_sizes["val"] == pytest.approx(0.1 * n, abs=1)
    x, y, idx = get_split(spec, "val")[3]
    assert x.shape == shape and x.dtype == torch.float32
    assert y.dtype == torch.int64 and idx.dtype == torch.int64 and int(idx) == 3
    assert DatasetSpec.model_validate_json(spec.model_dump_json()) == spec


def test_splits_are_stratified_and_disjoint():
    spec = build_dataset_spec(DataConfig(source="mnist5k"))
    parts = {s: get_split(spec, s) for s in data.SPLITS}
    positions = np.concatenate([d.source_positions for d in parts.values()])
    assert len(np.unique(positions)) == len(positions) == 5000
    overall = np.bincount(parts["train"].source.labels, minlength=10) / 5000
    for ds in parts.values():
        share = np.bincount(_labels_of(ds), minlength=10) / len(ds)
        np.testing.assert_allclose(share, overall, atol=0.02)


def test_split_is_deterministic_and_follows_the_seed():
    cfg = DataConfig(source="digits")
    a, b = build_dataset_spec(cfg), build_dataset_spec(cfg)
    assert a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(get_split(a, "train").source_positions,
                                  get_split(b, "train").source_positions)
    other = build_dataset_spec(DataConfig(source="digits", split_seed=1))
    assert other.fingerprint != a.fingerprint
    assert not np.array_equal(get_split(other, "train").source_positions,
                              get_split(a, "train").source_positions)
    # Loader-only settings do not touch the fingerprint.
    assert build_dataset_spec(DataConfig(source="digits", batch_size=7, augment=True,
                                         num_workers=2)).fingerprint == a.fingerprint


def test_split_and_fingerprint_match_recorded_values():
    # Recorded once; every pytest run is a fresh process (with a fresh PYTHONHASHSEED), so this
    # checks the split is the same across processes. If it fails after a scikit-learn upgrade,
    # the split algorithm changed: every cached training step will (rightly) re-run.
    spec = build_dataset_spec(DataConfig(source="digits"))
    assert spec.split_sizes == {"train": 1257, "val": 180, "test": 360}
    recorded = {"train": [0, 1, 2, 3, 4, 6], "val": [5, 15, 29, 31, 41, 54],
                "test": [21, 24, 28, 34, 35, 37]}
    for split, head in recorded.items():
        assert get_split(spec, split).source_positions[:6].tolist() == head
    assert spec.fingerprint == "136a3d33090c59e8e8d3d0de357b1a6d724e3d965c93922b842545495289d3f0"


def test_fingerprint_changes_with_one_pixel_of_in_memory_data():
    cfg = DataConfig(source="digits")
    src = sources._digits_arrays()
    images = src.images.copy()
    same = sources._ArraySource(images, src.labels, src.classes, scale=16.0)
    images2 = images.copy()
    images2[100, 0, 3, 4] = (images2[100, 0, 3, 4] + 1) % 17
    changed = sources._ArraySource(images2, src.labels, src.classes, scale=16.0)
    base = build_dataset_spec(cfg).fingerprint
    assert data._spec_from_source(cfg, same).fingerprint == base
    assert data._spec_from_source(cfg, changed).fingerprint != base


def test_image_size_is_refused_for_bundled_sources():
    with pytest.raises(DataError, match="only apply to imagefolder"):
        build_dataset_spec(DataConfig(source="digits", image_size=16))


# ---------------------------------------------------------------------- imagefolder
def test_imagefolder_happy_path_reads_from_disk(tmp_path):
    root = _folder(tmp_path / "imgs", {"cat": "RGB", "dog": "RGB", "emu": "RGB"})
    spec = build_dataset_spec(_folder_cfg(root))
    assert spec.classes == ["cat", "dog", "emu"]
    assert spec.input_shape == (3, 8, 8)
    assert sum(spec.split_sizes.values()) == 36
    ds = get_split(spec, "train", normalize=False)
    train = torch.stack([ds[i][0] for i in range(len(ds))]).double()
    np.testing.assert_allclose(spec.mean, train.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    std = train.std(dim=(0, 2, 3), unbiased=False).numpy()
    np.testing.assert_allclose(spec.std, std, atol=1e-6)
    x, y, _ = ds[0]
    path = ds.source.files[ds.source_positions[0]]
    expected = np.asarray(Image.open(path).convert("RGB").resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(x.numpy(), expected.transpose(2, 0, 1) / 255.0, atol=1e-6)
    assert spec.classes[int(y)] == path.parent.name


def test_imagefolder_fingerprint_tracks_one_pixel(tmp_path):
    root = _folder(tmp_path / "imgs", {"a": "L", "b": "L"})
    cfg = _folder_cfg(root)
    before = build_dataset_spec(cfg).fingerprint
    assert build_dataset_spec(cfg).fingerprint == before
    target = root / "b" / "005.png"
    original = np.asarray(Image.open(target)).copy()
    edited = original.copy()
    edited[0, 0] ^= 1
    Image.fromarray(edited).save(target)
    assert build_dataset_spec(cfg).fingerprint != before
    Image.fromarray(original).save(target)
    assert build_dataset_spec(cfg).fingerprint == before


def test_imagefolder_missing_folder(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope")) + ".*does not exist"):
        build_dataset_spec(_folder_cfg(tmp_path / "nope"))


def test_imagefolder_needs_image_size(tmp_path):
    root = _folder(tmp_path / "imgs", {"a": "L", "b": "L"})
    with pytest.raises(DataError, match="needs data.image_size"):
        build_dataset_spec(DataConfig(source=f"imagefolder:{root}"))


def test_imagefolder_empty_class(tmp_path):
    root = _folder(tmp_path / "imgs", {"a": "L", "b": "L"})
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=re.escape(str(root / "empty")) + " holds no images"):
        build_dataset_spec(_folder_cfg(root))


@pytest.mark.parametrize("grayscale, truncated", [(None, False), (True, True), (None, True)])
def test_imagefolder_corrupt_image_is_named(tmp_path, grayscale, truncated):
    root = _folder(tmp_path / "imgs", {"a": "L", "b": "L"}, size=(64, 64))
    bad = root / "a" / "007.png"
    content = bad.read_bytes()
    bad.write_bytes(content[: len(content) // 2] if truncated else b"definitely not a png")
    with pytest.raises(DataError, match=r"corrupt or unreadable image .*007\.png"):
        build_dataset_spec(_folder_cfg(root, grayscale=grayscale))


def test_imagefolder_mixed_gray_and_rgb_become_rgb(tmp_path):
    root = _folder(tmp_path / "imgs", {"gray": "L", "rgb": "RGB"})
    spec = build_dataset_spec(_folder_cfg(root))
    assert spec.input_shape == (3, 8, 8)
    ds = get_split(spec, "train", normalize=False)
    gray = [ds[i][0] for i in range(len(ds)) if spec.classes[int(ds[i][1])] == "gray"]
    assert gray and all(x.shape == (3, 8, 8) for x in gray)
    assert all(torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]) for x in gray)
    forced = build_dataset_spec(_folder_cfg(root, grayscale=True))
    assert forced.input_shape == (1, 8, 8)
    assert get_split(forced, "test")[0][0].shape == (1, 8, 8)
    assert forced.fingerprint != spec.fingerprint


def test_imagefolder_change_after_spec_is_detected(tmp_path):
    root = _folder(tmp_path / "imgs", {"a": "L", "b": "L"})
    spec = build_dataset_spec(_folder_cfg(root))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "a" / "extra.png")
    with pytest.raises(DataError, match="changed since its spec was built"):
        get_split(spec, "train")


# ---------------------------------------------------------------------- torchvision
def test_torchvision_missing_files_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = DataConfig(source="torchvision:MNIST", root="~/tv", download=False)
    root = re.escape(str(tmp_path / "tv"))
    expected = f"missing .*under {root}.*data.download: true.*under {root}"
    with pytest.raises(DataError, match=expected):
        build_dataset_spec(cfg)


def test_torchvision_failed_download_names_cause_and_fix(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    cfg = DataConfig(source="torchvision:CIFAR10", root=str(tmp_path), download=True)
    with pytest.raises(DataError, match=r"downloading torchvision:CIFAR10 .* failed: .*name "
                                        r"resolution.*put them under"):
        build_dataset_spec(cfg)


@pytest.mark.parametrize("name, channels_last", [("MNIST", False), ("CIFAR100", True)])
def test_torchvision_official_test_split_and_layout(tmp_path, monkeypatch, name, channels_last):
    import torchvision.datasets

    class Fake:  # stands in for the downloaded dataset: same attributes as torchvision's
        classes = ["zero", "one"]

        def __init__(self, root, train, download):
            n = 40 if train else 10
            rng = np.random.RandomState(int(train))
            shape = (n, 6, 6, 3) if channels_last else (n, 6, 6)
            pixels = rng.randint(0, 256, shape).astype(np.uint8)
            self.data = pixels if channels_last else torch.from_numpy(pixels)
            self.targets = [i % 2 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, name, Fake)
    spec = build_dataset_spec(DataConfig(source=f"torchvision:{name}", root=str(tmp_path / name),
                                         val_fraction=0.25))
    assert spec.input_shape == ((3 if channels_last else 1), 6, 6)
    assert spec.classes == ["zero", "one"]
    assert spec.split_sizes == {"train": 30, "val": 10, "test": 10}  # test = official test set
    test = get_split(spec, "test", normalize=False)
    np.testing.assert_array_equal(test.source_positions, np.arange(40, 50))
    official = Fake(None, train=False, download=False).data
    expected = np.asarray(official[3], dtype=np.float32) / 255.0
    expected = expected.transpose(2, 0, 1) if channels_last else expected[None]
    np.testing.assert_allclose(test[3][0].numpy(), expected, atol=1e-7)


def test_unknown_torchvision_name_lists_valid_ones():
    with pytest.raises(DataError, match="valid names: CIFAR10, CIFAR100, FashionMNIST, MNIST"):
        build_dataset_spec(DataConfig(source="torchvision:ImageNet"))


# --------------------------------------------------------------------------- loaders
def test_loader_normalises_with_train_statistics():
    spec = build_dataset_spec(DataConfig(source="mnist5k"))
    xs, ys, idx = zip(*make_loader(spec, "train", train=False, batch_size=1000), strict=True)
    x, y, i = torch.cat(xs), torch.cat(ys), torch.cat(idx)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1.0) < 0.05
    np.testing.assert_array_equal(i.numpy(), np.arange(spec.split_sizes["train"]))
    ds = get_split(spec, "train")
    np.testing.assert_array_equal(y.numpy(), _labels_of(ds))
    raw = torch.cat([b[0] for b in make_loader(spec, "val", train=False, normalize=False)])
    assert raw.min().item() >= 0.0 and 0.99 < raw.max().item() <= 1.0


def test_train_loader_shuffles_reproducibly():
    spec = build_dataset_spec(DataConfig(source="digits"))
    first = [next(iter(make_loader(spec, "train", train=True, seed=s)))[2] for s in (0, 0, 1)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    assert len(set(first[0].tolist())) == 128


def _shifts(x: torch.Tensor, pad: int, flip: bool) -> list[torch.Tensor]:
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    h, w = x.shape[1:]
    offsets = range(2 * pad + 1)
    crops = [padded[:, dy:dy + h, dx:dx + w] for dy in offsets for dx in offsets]
    return crops + ([c.flip(-1) for c in crops] if flip else [])


def test_augmentation_is_seeded_and_crops_without_flipping_digits():
    spec = build_dataset_spec(DataConfig(source="digits", augment=True))
    batches = [next(iter(make_loader(spec, "train", train=True, seed=s, normalize=False)))
               for s in (5, 5, 6)]
    assert torch.equal(batches[0][0], batches[1][0])
    assert not torch.equal(batches[0][0], batches[2][0])
    plain = get_split(spec, "train", normalize=False)
    x, _, idx = batches[0]
    for aug, i in zip(x[:32], idx[:32], strict=True):  # pad 1 for 8x8; never mirrored
        assert any(torch.equal(aug, c) for c in _shifts(plain[int(i)][0], 1, flip=False))
    assert not torch.equal(x, torch.stack([plain[int(i)][0] for i in idx]))
    # Augmentation only in the train split of a train loader.
    val = next(iter(make_loader(spec, "val", train=True, normalize=False)))
    assert torch.equal(val[0][0], get_split(spec, "val", normalize=False)[int(val[2][0])][0])
    with pytest.raises(DataError, match="train split only"):
        get_split(spec, "val", augment=True)


def test_augmentation_flips_colour_images(tmp_path):
    root = _folder(tmp_path / "imgs", {"a": "RGB", "b": "RGB"}, n=20, size=(16, 16))
    spec = build_dataset_spec(DataConfig(source=f"imagefolder:{root}", image_size=16, augment=True))
    ds = get_split(spec, "train", normalize=False, augment=True)
    plain = get_split(spec, "train", normalize=False)
    flipped = 0
    for i in range(len(ds)):
        aug, crops = ds[i][0], _shifts(plain[i][0], 2, flip=True)
        match = [k for k, c in enumerate(crops) if torch.equal(aug, c)]
        assert match, f"sample {i} is not a padded crop (or its mirror)"
        flipped += match[0] >= len(crops) // 2
    assert 0 < flipped < len(ds)


@pytest.mark.slow
def test_worker_loaders_are_reproducible():
    spec = build_dataset_spec(DataConfig(source="digits", augment=True, num_workers=2))
    loaders = [make_loader(spec, "train", train=True, seed=3, batch_size=64) for _ in range(2)]
    assert loaders[0].persistent_workers and loaders[0].num_workers == 2
    a, b = ([batch for _, batch in zip(range(3), loader, strict=False)] for loader in loaders)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


def test_bad_split_name():
    spec = build_dataset_spec(DataConfig(source="digits"))
    with pytest.raises(DataError, match="unknown split 'training'; valid: train, val, test"):
        get_split(spec, "training")
