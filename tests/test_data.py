"""Calibration / evaluation data loading: image folders, tensor files, sampling and every input error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from repapq_deploy.data.loader import Dataset, Preprocess, load_dataset, preprocess_from_timm
from repapq_deploy.errors import DeployError

RGB = Preprocess(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
GRAY = Preprocess(input_size=(1, 16, 16), mean=(0.5,), std=(0.25,))


def _image(path: Path, seed: int, size: tuple[int, int] = (24, 20), mode: str = "RGB") -> Path:
    """Write a random image (PIL size is W,H) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """Two classes in ImageFolder layout: cat (3 images, one nested), dog (2 images, mixed formats)."""
    root = tmp_path / "imgs"
    _image(root / "cat" / "a.png", 0)
    _image(root / "cat" / "b.PNG", 1)
    _image(root / "cat" / "sub" / "c.png", 2)
    _image(root / "dog" / "d.jpg", 3)
    _image(root / "dog" / "e.jpeg", 4, mode="L")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def _save_npz(path: Path, n: int = 6, **extra: np.ndarray) -> Path:
    x = np.random.default_rng(0).standard_normal((n, 3, 16, 16)).astype(np.float32)
    np.savez(path, x=x, **extra)
    return path


def _error(path: Path | str, **kwargs) -> str:
    kwargs.setdefault("preprocess", RGB)
    with pytest.raises(DeployError) as info:
        load_dataset(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- image folders


def test_folder_with_labels(class_folder: Path) -> None:
    ds = load_dataset(class_folder, preprocess=RGB, labelled=True, num_classes=2, option="eval")
    assert isinstance(ds, Dataset)
    assert ds.kind == "images" and ds.source == str(class_folder)
    assert ds.x.shape == (5, 3, 16, 16) and ds.x.dtype == torch.float32
    assert ds.classes == ["cat", "dog"]
    assert ds.y is not None and ds.y.dtype == torch.int64
    assert ds.y.tolist() == [0, 0, 0, 1, 1]  # sorted paths: cat/a, cat/b, cat/sub/c, dog/d, dog/e
    # normalized with mean 0.5 / std 0.25: pixels in [0, 1] map to [-2, 2]
    assert ds.x.min() >= -2 and ds.x.max() <= 2 and ds.x.min() < -1


def test_folder_without_labels(class_folder: Path) -> None:
    ds = load_dataset(class_folder, preprocess=RGB)
    assert ds.x.shape == (5, 3, 16, 16)
    assert ds.y is None and ds.classes is None


def test_folder_matches_manual_preprocessing(tmp_path: Path) -> None:
    path = _image(tmp_path / "imgs" / "a.png", 0, size=(40, 30))
    pre = Preprocess(input_size=(3, 8, 8), mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), resize=10)
    ds = load_dataset(tmp_path / "imgs", preprocess=pre)
    # shorter side 30 -> 10 gives 13x10 (W x H), then the central 8x8
    img = Image.open(path).resize((13, 10), Image.Resampling.BILINEAR)
    crop = np.asarray(img.crop((2, 1, 10, 9)), dtype=np.float32) / 255
    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
    expected = (torch.from_numpy(crop).permute(2, 0, 1) - mean) / std
    torch.testing.assert_close(ds.x[0], expected)


def test_grayscale_single_channel(class_folder: Path) -> None:
    ds = load_dataset(class_folder, preprocess=GRAY, labelled=True)
    assert ds.x.shape == (5, 1, 16, 16)
    assert ds.y is not None and ds.y.tolist() == [0, 0, 0, 1, 1]


def test_hidden_files_are_skipped(class_folder: Path) -> None:
    (class_folder / "cat" / "._a.png").write_bytes(b"macOS resource fork")
    assert len(load_dataset(class_folder, preprocess=RGB).x) == 5


def test_many_images_progress_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(70):
        _image(tmp_path / "imgs" / f"{i:03d}.png", i, size=(16, 16))
    ds = load_dataset(tmp_path / "imgs", preprocess=RGB)
    assert ds.x.shape == (70, 3, 16, 16)
    assert capsys.readouterr().out == ""


def test_count_and_seed_are_deterministic(class_folder: Path) -> None:
    full = load_dataset(class_folder, preprocess=RGB, labelled=True)
    a = load_dataset(class_folder, preprocess=RGB, labelled=True, count=3, seed=7)
    b = load_dataset(class_folder, preprocess=RGB, labelled=True, count=3, seed=7)
    assert a.x.shape == (3, 3, 16, 16)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    order = np.random.default_rng(7).permutation(5)[:3]
    assert torch.equal(a.x, full.x[order]) and torch.equal(a.y, full.y[order])
    others = [load_dataset(class_folder, preprocess=RGB, count=3, seed=s).x for s in range(1, 5)]
    assert any(not torch.equal(a.x, x) for x in others)


# ---------------------------------------------------------------- tensor files


def test_npz_with_labels(tmp_path: Path) -> None:
    path = _save_npz(tmp_path / "eval.npz", y=np.array([0, 1, 2, 3, 4, 9], dtype=np.int32))
    ds = load_dataset(path, preprocess=RGB, labelled=True, num_classes=10, option="eval")
    assert ds.kind == "npz" and ds.classes is None
    assert ds.x.shape == (6, 3, 16, 16) and ds.x.dtype == torch.float32
    assert ds.y is not None and ds.y.dtype == torch.int64 and ds.y.tolist() == [0, 1, 2, 3, 4, 9]
    # tensor files are already preprocessed: values pass through untouched
    np.testing.assert_array_equal(ds.x.numpy(), np.load(path)["x"])


def test_npz_without_labels_and_float64(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16))
    np.savez(tmp_path / "calib.npz", x=x)
    ds = load_dataset(tmp_path / "calib.npz", preprocess=RGB)
    assert ds.y is None and ds.x.dtype == torch.float32
    torch.testing.assert_close(ds.x, torch.from_numpy(x).float())


def test_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "calib.npy", np.zeros((3, 1, 16, 16), dtype=np.float32))
    ds = load_dataset(tmp_path / "calib.npy", preprocess=GRAY)
    assert ds.kind == "npy" and ds.x.shape == (3, 1, 16, 16) and ds.y is None


def test_pt_tensor_and_dict(tmp_path: Path) -> None:
    x = torch.randn(5, 3, 16, 16)
    torch.save(x, tmp_path / "t.pt")
    torch.save({"x": x.double(), "y": torch.tensor([1, 0, 1, 0, 1])}, tmp_path / "d.pt")
    plain = load_dataset(tmp_path / "t.pt", preprocess=RGB)
    assert plain.kind == "pt" and plain.y is None and torch.equal(plain.x, x)
    labelled = load_dataset(tmp_path / "d.pt", preprocess=RGB, labelled=True, num_classes=2)
    assert torch.allclose(labelled.x, x) and labelled.y.tolist() == [1, 0, 1, 0, 1]


def test_tensor_count_seed_and_oversized_count(tmp_path: Path) -> None:
    path = _save_npz(tmp_path / "c.npz", n=10, y=np.arange(10))
    a = load_dataset(path, preprocess=RGB, count=4, seed=3)
    assert a.y.tolist() == np.random.default_rng(3).permutation(10)[:4].tolist()
    assert torch.equal(a.x, torch.from_numpy(np.load(path)["x"])[a.y])
    everything = load_dataset(path, preprocess=RGB, count=1000)
    assert len(everything.x) == 10 and sorted(everything.y.tolist()) == list(range(10))
    assert load_dataset(path, preprocess=RGB).y.tolist() == list(range(10))  # count=None keeps file order


# ---------------------------------------------------------------- preprocessing config


def test_preprocess_from_timm_matches_timm_eval_transform(tmp_path: Path) -> None:
    model = timm.create_model("test_byobnet")
    pre = preprocess_from_timm(model)
    cfg = timm.data.resolve_data_config(model=model)
    assert pre.input_size == cfg["input_size"] and pre.crop_pct == cfg["crop_pct"]
    assert pre.interpolation == cfg["interpolation"] and pre.mean == tuple(cfg["mean"])
    path = _image(tmp_path / "imgs" / "a.png", 0, size=(200, 170))
    ds = load_dataset(tmp_path / "imgs", preprocess=pre)
    with Image.open(path) as im:
        expected = timm.data.create_transform(**cfg)(im.convert("RGB"))
    torch.testing.assert_close(ds.x[0], expected)


def test_preprocess_overrides_win_and_round_trip() -> None:
    model = timm.create_model("test_byobnet")
    pre = preprocess_from_timm(model, input_size=(1, 32, 32), mean=[0.3], std=[0.4], resize=36)
    assert (pre.input_size, pre.mean, pre.std, pre.resize) == ((1, 32, 32), (0.3,), (0.4,), 36)
    assert Preprocess(**pre.to_dict()) == pre
    with pytest.raises(DeployError, match="mean"):
        preprocess_from_timm(model, input_size=(1, 32, 32))  # ImageNet's 3-value mean for 1 channel


def test_preprocess_rejects_resize_smaller_than_crop() -> None:
    with pytest.raises(DeployError, match="resize 12"):
        Preprocess(input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, resize=12)


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    message = _error(tmp_path / "nope.npz", option="eval")
    assert message.startswith(f"eval {tmp_path / 'nope.npz'}: not found")


def test_unknown_extension(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("1,2,3")
    message = _error(tmp_path / "data.csv")
    assert "data.csv" in message and ".csv" in message
    assert all(ext in message for ext in (".npz", ".npy", ".pt", "png", "jpg"))


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    message = _error(tmp_path / "empty")
    assert str(tmp_path / "empty") in message and "no images" in message
    assert all(ext in message for ext in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))


def test_corrupt_image(class_folder: Path) -> None:
    (class_folder / "dog" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    message = _error(class_folder)
    assert "broken.jpg" in message and "cannot read image" in message


def test_truncated_image(class_folder: Path) -> None:
    data = (class_folder / "dog" / "d.jpg").read_bytes()
    (class_folder / "dog" / "d.jpg").write_bytes(data[: len(data) // 2])
    assert "d.jpg" in _error(class_folder)


def test_labelled_folder_with_loose_images(class_folder: Path) -> None:
    _image(class_folder / "loose.png", 9)
    message = _error(class_folder, labelled=True, option="eval")
    assert message.startswith(f"eval {class_folder} has no labels")
    assert "loose.png" in message and "sub-folder" in message


def test_more_class_folders_than_classes(class_folder: Path) -> None:
    message = _error(class_folder, labelled=True, num_classes=1)
    assert "'dog'" in message and "[0, 1)" in message


def test_wrong_channel_count_and_size(tmp_path: Path) -> None:
    path = _save_npz(tmp_path / "rgb.npz")
    message = _error(path, preprocess=GRAY)
    assert "rgb.npz" in message and "(6, 3, 16, 16)" in message and "(N, 1, 16, 16)" in message
    np.save(tmp_path / "small.npy", np.zeros((2, 3, 8, 8), dtype=np.float32))
    message = _error(tmp_path / "small.npy")
    assert "small.npy" in message and "(2, 3, 8, 8)" in message and "(N, 3, 16, 16)" in message
    torch.save(torch.zeros(3, 16, 16), tmp_path / "three_d.pt")
    assert "(3, 16, 16)" in _error(tmp_path / "three_d.pt")


def test_images_for_unsupported_channel_count(class_folder: Path) -> None:
    four = Preprocess(input_size=(4, 16, 16), mean=(0.5,) * 4, std=(0.25,) * 4)
    assert "4 input channels" in _error(class_folder, preprocess=four)


def test_nan_values(tmp_path: Path) -> None:
    x = np.zeros((4, 3, 16, 16), dtype=np.float32)
    x[2, 1, 5, 5] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    message = _error(tmp_path / "nan.npz")
    assert "nan.npz" in message and "NaN" in message and "index 2" in message


def test_empty_and_integer_tensors(tmp_path: Path) -> None:
    np.save(tmp_path / "none.npy", np.zeros((0, 3, 16, 16), dtype=np.float32))
    assert "no samples" in _error(tmp_path / "none.npy")
    np.save(tmp_path / "raw.npy", np.zeros((2, 3, 16, 16), dtype=np.uint8))
    message = _error(tmp_path / "raw.npy")
    assert "raw.npy" in message and "uint8" in message


def test_missing_x_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "keys.npz", images=np.zeros((2, 3, 16, 16), dtype=np.float32))
    message = _error(tmp_path / "keys.npz")
    assert "keys.npz" in message and "'x'" in message and "images" in message
    torch.save({"data": torch.zeros(2, 3, 16, 16)}, tmp_path / "keys.pt")
    message = _error(tmp_path / "keys.pt")
    assert "keys.pt" in message and "'x'" in message and "data" in message


def test_unreadable_tensor_files(tmp_path: Path) -> None:
    for name in ("junk.npz", "junk.npy", "junk.pt"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 8)
        message = _error(tmp_path / name)
        assert name in message and "cannot read" in message


def test_labels_out_of_range(tmp_path: Path) -> None:
    path = _save_npz(tmp_path / "eval.npz", y=np.array([0, 1, 2, 10, 3, 4]))
    message = _error(path, labelled=True, num_classes=10, option="eval")
    assert "eval.npz" in message and "label 10" in message and "index 3" in message and "[0, 10)" in message
    _save_npz(tmp_path / "neg.npz", y=np.array([0, -1, 0, 0, 0, 0]))
    assert "label -1" in _error(tmp_path / "neg.npz")


def test_bad_label_dtype_and_shape(tmp_path: Path) -> None:
    _save_npz(tmp_path / "float.npz", y=np.zeros(6, dtype=np.float32))
    assert "integer" in _error(tmp_path / "float.npz", labelled=True)
    _save_npz(tmp_path / "onehot.npz", y=np.eye(6, dtype=np.int64))
    message = _error(tmp_path / "onehot.npz", labelled=True)
    assert "onehot.npz" in message and "(6, 6)" in message and "(6,)" in message
    _save_npz(tmp_path / "short.npz", y=np.zeros(5, dtype=np.int64))
    assert "(5,)" in _error(tmp_path / "short.npz")


def test_no_labels_when_labelled(tmp_path: Path) -> None:
    path = _save_npz(tmp_path / "calib.npz")
    message = _error(path, labelled=True, option="eval")
    assert message.startswith(f"eval {path} has no labels:")
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 16, 16), dtype=np.float32))
    assert "has no labels" in _error(tmp_path / "x.npy", labelled=True)


def test_non_positive_count(tmp_path: Path) -> None:
    path = _save_npz(tmp_path / "c.npz")
    assert "c.npz" in _error(path, count=0) and "at least 1" in _error(path, count=-3)
