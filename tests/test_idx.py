"""Fashion-MNIST from local IDX files: the reader, the source, and its errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from kdpipe.config import DataConfig
from kdpipe.configfile import parse_config
from kdpipe.data import DataError, build_dataset_spec, get_split
from kdpipe.idx import IdxError, read_idx, read_idx_split
from kdpipe.preflight import preflight
from kdpipe.sources import FASHION_CLASSES


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, *,
                gz: bool) -> None:
    prefix = {"train": "train", "test": "t10k"}[split]
    for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def fake_fashion(folder: Path, *, gz: bool, n_train: int = 100, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        write_split(folder, split, rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10, gz=gz)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    fake_fashion(tmp_path, gz=gz)
    images, labels = read_idx_split(tmp_path, "train")
    assert images.shape == (100, 1, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(100)]


def test_source_keeps_the_official_test_split(tmp_path: Path) -> None:
    fake_fashion(tmp_path / "fm", gz=True)
    spec = build_dataset_spec(DataConfig(source=f"fashion_mnist:{tmp_path / 'fm'}", val_fraction=0.2))
    assert spec.classes == list(FASHION_CLASSES)
    assert spec.split_sizes == {"train": 80, "val": 20, "test": 20}
    # The test split is exactly the t10k file, in order.
    test = get_split(spec, "test", normalize=False)
    _, t10k_labels = read_idx_split(tmp_path / "fm", "test")
    assert [int(test[i][1]) for i in range(len(test))] == t10k_labels.tolist()


def test_data_root_in_torchvision_layout_is_found(tmp_path: Path) -> None:
    fake_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    spec = build_dataset_spec(DataConfig(source="fashion_mnist", root=str(tmp_path),
                                         val_fraction=0.2))
    assert spec.split_sizes["test"] == 20


def test_wrong_magic_number_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 2, 2))))  # images where labels belong
    with pytest.raises(IdxError, match=rf"{path} is not an IDX file .* 1 dimension"):
        read_idx(path, 1)


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 28, 28)))[:-10])
    with pytest.raises(IdxError, match=rf"{path} is truncated .*\(4, 28, 28\)"):
        read_idx(path, 3)
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28))))[:-30])
    with pytest.raises(IdxError, match=f"cannot read IDX file {gz}"):
        read_idx(gz, 3)


def test_counts_that_disagree_name_both_files(tmp_path: Path) -> None:
    write_split(tmp_path, "train", np.zeros((5, 28, 28)), np.zeros(4), gz=False)
    with pytest.raises(IdxError, match="holds 5 images but .*holds 4 labels"):
        read_idx_split(tmp_path, "train")


def test_missing_files_say_where_and_how_to_get_them(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kdpipe.sources.DEBIAN_FASHION_DIR", tmp_path / "no-debian-package")
    cfg = DataConfig(source="fashion_mnist", root=str(tmp_path))
    with pytest.raises(DataError) as info:
        build_dataset_spec(cfg)
    message = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message and "no-debian-package" in message
    assert "apt install dataset-fashion-mnist" in message and "data.download: true" in message
    assert "fashion_mnist:<folder" in message


def test_preflight_finds_missing_files_before_any_step(tmp_path: Path) -> None:
    cfg = parse_config({"data": {"source": f"fashion_mnist:{tmp_path}"}})
    (problem,) = preflight(cfg, reachable=lambda url: None)
    assert problem.path == "parameters.data.source"
    assert "apt install dataset-fashion-mnist" in problem.message
    fake_fashion(tmp_path, gz=True)
    assert preflight(cfg, reachable=lambda url: None) == []
