import shutil

import numpy as np
import pytest
import torch

from mercury_onnx.calib.data import Preprocess, choose, load_image_set, preprocess_for
from mercury_onnx.formats.images import ImageError, list_images
from mercury_onnx.models import MercuryConfig, build_mercury

from ..conftest import CIFAR_TEST

CLASSES = ["airplane", "cat", "ship"]
PRE32 = Preprocess((32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture
def tiny(tmp_path, cifar_test):
    """tmp ImageFolder with 4 real CIFAR JPEGs in each of 3 classes."""
    root = tmp_path / "data"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for f in sorted((cifar_test / c).iterdir())[:4]:
            shutil.copy(f, root / c / f.name)
    return root


def test_loads_real_jpegs_labels_in_given_order(tiny, cifar_test):
    ds, pos = load_image_set(tiny, PRE32, classes=["ship", "airplane", "cat"], progress=False)
    assert len(ds) == 12 and ds.images.dtype == torch.uint8 and ds.images.shape == (12, 32, 32, 3)
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4      # ship first, as asked
    x, y = next(ds.batches(5))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    # normalisation: (pixel/255 - 0.5) / 0.25 for a known pixel of a known file
    from PIL import Image
    raw = np.asarray(Image.open(sorted((cifar_test / "ship").iterdir())[0]).convert("RGB"))
    assert torch.allclose(x[0, :, 0, 0], (torch.tensor(raw[0, 0] / 255.0).float() - 0.5) / 0.25, atol=1e-6)


def test_resizes_to_model_input(tiny):
    ds, _ = load_image_set(tiny, Preprocess((48, 48), (0.5,) * 3, (0.5,) * 3), progress=False)
    assert ds.images.shape == (12, 48, 48, 3)


def test_subset_is_deterministic_balanced_and_disjoint():
    labels = [i // 100 for i in range(1000)]
    a, b = choose(labels, 50, seed=3, balanced=True), choose(labels, 50, seed=3, balanced=True)
    assert a == b and len(set(a)) == 50
    assert np.bincount([labels[i] for i in a]).tolist() == [5] * 10
    held = choose(labels, 100, seed=4, balanced=True)
    rest = choose(labels, 200, seed=3, balanced=True, exclude=set(held))
    assert not set(held) & set(rest) and len(rest) == 200
    assert choose(labels, 50, seed=5, balanced=True) != a


def test_preprocess_from_checkpoint_json(ref_json):
    cfg = MercuryConfig.from_checkpoint_json(ref_json)
    pre = preprocess_for(build_mercury(cfg))
    assert pre.size == (32, 32) and pre.mean == tuple(cfg.mean) and pre.std == tuple(cfg.std)


def test_cache_round_trip(tiny, tmp_path, monkeypatch):
    import mercury_onnx.calib.data as data
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    a, _ = load_image_set(tiny, PRE32, count=6, cache=True, progress=False)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    b, _ = load_image_set(tiny, PRE32, count=6, cache=True, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


# ---------------------------------------------------------------- bad data

def test_missing_dir(tmp_path):
    with pytest.raises(ImageError, match="not found.*nope"):
        list_images(tmp_path / "nope")


def test_corrupt_jpeg_names_the_file(tiny):
    bad = tiny / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        load_image_set(tiny, PRE32, progress=False)


def test_truncated_jpeg_names_the_file(tiny):
    src = sorted((tiny / "cat").iterdir())[0]
    (tiny / "cat" / "truncated.jpg").write_bytes(src.read_bytes()[:200])
    with pytest.raises(ImageError, match="truncated.jpg"):
        load_image_set(tiny, PRE32, progress=False)


def test_empty_class_folder_names_the_folder(tiny):
    (tiny / "dog").mkdir()
    with pytest.raises(ImageError, match="dog.*no images"):
        list_images(tiny)


def test_class_list_mismatch(tiny):
    with pytest.raises(ImageError, match=r"missing \['dog'\].*unexpected \['ship'\]"):
        list_images(tiny, classes=["airplane", "cat", "dog"])


def test_no_class_folders(tmp_path):
    """A flat folder of photos is one unnamed class when no classes are asked for (payload sizes,
    codec fitting on ../shared/data/imagenet-sample), and refused where a model's classes are."""
    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    paths, labels, classes = list_images(tmp_path)
    assert [p.name for p in paths] == ["x.jpg"] and labels == [0] and classes == [""]
    with pytest.raises(ImageError, match="no class folders"):
        list_images(tmp_path, classes=["airplane", "cat"])
    (tmp_path / "x.jpg").unlink()
    with pytest.raises(ImageError, match="no class folders"):
        list_images(tmp_path)


def test_real_split_matches_reference_classes(ref_json):
    cfg = MercuryConfig.from_checkpoint_json(ref_json)
    paths, labels, classes = list_images(CIFAR_TEST, cfg.classes)
    assert classes == cfg.classes and len(paths) == 10000 and np.bincount(labels).tolist() == [1000] * 10
