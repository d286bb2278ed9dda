"""Procedural scenes, image folders and bundled photos (explore.data)."""

import socket
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from explore.data import scenes, wild
from explore.data import ImageFolderData

N_CLASSES = len(scenes.CLASS_NAMES)


def box_down(img, factor):
    """[N,H,W,C] -> [N,H/f,W/f,C] block means."""
    n, h, w, c = img.shape
    return img.reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))


@pytest.fixture(scope="module")
def per_class():
    """8 scenes of each class (labels 0,0,...,1,1,...) rendered at 32 and 128 px."""
    labels = np.repeat(np.arange(N_CLASSES), 8)
    params = scenes.sample_params(np.random.default_rng(123), labels)
    return labels, params, scenes.render(params, 32), scenes.render(params, 128)


# --- scenes -------------------------------------------------------------------------------------


def test_class_names():
    assert scenes.class_names() == scenes.CLASS_NAMES
    assert len(scenes.CLASS_NAMES) >= 8 and len(set(scenes.CLASS_NAMES)) == len(scenes.CLASS_NAMES)


def test_render_batch_is_deterministic_per_seed():
    a, la = scenes.render_batch(7, 16, 32)
    b, lb = scenes.render_batch(7, 16, 32)
    c, _ = scenes.render_batch(8, 16, 32)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert np.abs(a.astype(int) - c).mean() > 5


def test_render_is_a_function_of_params():
    params = scenes.sample_params(np.random.default_rng(0), np.arange(N_CLASSES))
    np.testing.assert_array_equal(scenes.render(params, 32), scenes.render(params, 32))
    # a scene renders the same alone or inside a batch
    np.testing.assert_allclose(scenes.render(params.take([3]), 32)[0], scenes.render(params, 32)[3], atol=1e-6)


def test_labels_are_honoured():
    labels = np.array([7, 0, 3, 3, 5, 1, 6, 2, 4])
    _, out = scenes.render_batch(0, len(labels), 32, labels=labels)
    np.testing.assert_array_equal(out, labels)
    assert out.dtype == np.int64
    _, same = scenes.render_batch(0, 4, 32, labels=2)
    np.testing.assert_array_equal(same, [2, 2, 2, 2])
    with pytest.raises(ValueError, match="labels must be in"):
        scenes.sample_params(np.random.default_rng(0), np.array([N_CLASSES]))


@pytest.mark.parametrize("size", [32, 128, 256])
def test_shape_dtype_range(size):
    params = scenes.sample_params(np.random.default_rng(size), np.arange(N_CLASSES))
    img = scenes.render(params, size)
    assert img.shape == (N_CLASSES, size, size, 3) and img.dtype == np.float32
    assert img.min() >= 0 and img.max() <= 1
    assert np.isfinite(img).all()
    assert img.std(axis=(1, 2, 3)).min() > 0.02  # no blank scene


def test_uint8_and_model_space():
    img, labels = scenes.render_batch(1, 4, 32)
    assert img.dtype == np.uint8 and img.shape == (4, 32, 32, 3)
    x = scenes.to_model_space(img)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    f, _ = scenes.render_batch(1, 4, 32, dtype=np.float32)
    torch.testing.assert_close(scenes.to_model_space(f), x, atol=1 / 255, rtol=0)


def test_128_render_downscaled_is_close_to_32_render(per_class):
    labels, _, low, high = per_class
    diff = np.abs(box_down(high, 4) - low)
    per = {name: float(diff[labels == c].mean()) for c, name in enumerate(scenes.CLASS_NAMES)}
    rounded = {k: round(v, 4) for k, v in per.items()}
    print(f"\nmean |box4(render128) - render32| = {diff.mean():.4f}; per class {rounded}")
    assert diff.mean() < 0.015
    assert max(per.values()) < 0.03


def test_high_res_has_detail_low_res_cannot_show(per_class):
    _, _, low, high = per_class
    # energy above the 32 px Nyquist band: what is left after removing the box-downscaled image
    residual = high - np.repeat(np.repeat(box_down(high, 4), 4, 1), 4, 2)
    assert np.abs(residual).mean() > 0.005


def test_variety_within_each_class(per_class):
    labels, params, low, _ = per_class
    for c, name in enumerate(scenes.CLASS_NAMES):
        imgs = low[labels == c]
        d = np.abs(imgs[:, None] - imgs[None]).mean(axis=(2, 3, 4))
        off = d[np.triu_indices(len(imgs), 1)]
        assert off.min() > 0.01, f"{name}: two scenes are nearly identical ({off.min():.4f})"
        assert off.mean() > 0.03, f"{name}: too little variety ({off.mean():.4f})"


def test_classes_separable_by_nearest_class_mean():
    """A cheap proxy for 'a small classifier tells the classes apart': 4x4 mean colours, nearest class mean."""

    def features(x):
        return box_down(x, 8).reshape(len(x), -1)

    train, ytrain = scenes.render_batch(10, 640, 32, dtype=np.float32)
    test, ytest = scenes.render_batch(11, 320, 32, dtype=np.float32)
    means = np.stack([features(train)[ytrain == c].mean(0) for c in range(N_CLASSES)])
    pred = np.argmin(((features(test)[:, None] - means[None]) ** 2).sum(-1), axis=1)
    acc = (pred == ytest).mean()
    print(f"\nnearest-class-mean accuracy on 4x4 colour features: {acc:.3f}")
    assert acc > 0.9


def test_throughput_report():
    scenes.render_batch(0, 64, 32)  # warm up
    for size, n in ((32, 512), (128, 32)):
        t = time.perf_counter()
        scenes.render_batch(1, n, size)
        dt = time.perf_counter() - t
        print(f"\nrender_batch at {size} px: {n / dt:.0f} images/s")


def test_render_region_equals_crop_of_full_render():
    params = scenes.sample_params(np.random.default_rng(5), np.arange(N_CLASSES))
    full = scenes.render(params, 64)
    top = np.array([0, 5, 10, 17, 30, 44, 48, 3])
    left = np.array([48, 0, 7, 33, 20, 1, 12, 40])
    crops = scenes.render_region(params, 64, top, left, 16, 16)
    for i in range(N_CLASSES):
        np.testing.assert_allclose(crops[i], full[i, top[i] : top[i] + 16, left[i] : left[i] + 16], atol=1e-5)


def test_paired_crops_are_aligned():
    batch = next(scenes.paired_crops(3, 16, hr_crop=32, scale=4))
    assert batch.high.shape == (16, 3, 32, 32) and batch.low.shape == (16, 3, 8, 8)
    assert batch.labels.shape == (16,) and batch.labels.dtype == torch.int64
    down = torch.nn.functional.avg_pool2d(batch.high, 4)
    aligned = (down - batch.low).abs().mean().item()
    shifted = (down[..., 1:] - batch.low[..., :-1]).abs().mean().item()
    print(f"\npaired crops: |box4(high) - low| = {aligned:.4f} (one low-res pixel off: {shifted:.4f})")
    assert aligned < 0.05 and aligned < shifted / 2
    with pytest.raises(ValueError):
        next(scenes.paired_crops(0, 2, hr_crop=30, scale=4))


def test_scene_batches_with_low_res():
    it = scenes.scene_batches(0, 8, 64, low_res=16)
    b1, b2 = next(it), next(it)
    assert b1.x.shape == (8, 3, 64, 64) and b1.low.shape == (8, 3, 16, 16)
    assert b1.labels.dtype == torch.int64 and not torch.equal(b1.x, b2.x)
    assert b1.x.min() >= -1 and b1.x.max() <= 1
    # the low-res images are renders of the same scenes, not other scenes
    err = (torch.nn.functional.avg_pool2d(b1.x, 4) - b1.low).abs().mean().item()
    assert err < 0.05
    again = next(scenes.scene_batches(0, 8, 64, low_res=16))
    assert torch.equal(again.x, b1.x) and torch.equal(again.low, b1.low)
    assert next(scenes.scene_batches(0, 2, 32)).low is None


def test_preview_grid():
    grid = scenes.preview_grid(seed=0, per_class=8)
    assert grid.dtype == np.uint8 and grid.shape == (8 * 128 + 8 + 128, 8 * 128, 3)


# --- image folders ------------------------------------------------------------------------------


def _make_folder(root):
    (root / "b_dogs").mkdir(parents=True)
    (root / "a_cats").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "a_cats" / "rgb.png")
    Image.fromarray(np.full((30, 30), 100, np.uint8), mode="L").save(root / "a_cats" / "grey.png")
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255  # fully transparent red: composited over white
    Image.fromarray(rgba, mode="RGBA").save(root / "b_dogs" / "clear.png")
    Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(root / "b_dogs" / "photo.jpg", quality=90)
    (root / "b_dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "b_dogs" / "notes.txt").write_text("ignored")


def test_image_folder_loads_and_skips_unreadable(tmp_path):
    _make_folder(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = ImageFolderData(tmp_path, 16)
    assert data.class_names == ["a_cats", "b_dogs"]
    assert len(data) == 4 and len(data.skipped) == 1 and data.skipped[0][0].name == "broken.png"
    assert data.images.shape == (4, 16, 16, 3) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(np.sort(data.labels), [0, 0, 1, 1])
    grey = data.images[np.flatnonzero(data.labels == 0)[0]]
    assert (grey == 100).all()  # a_cats/grey.png sorts first
    clear = data.images[np.flatnonzero(data.labels == 1)[0]]
    assert (clear >= 254).all()  # b_dogs/clear.png: transparent -> white

    batch = next(data.batches(0, 6, low_res=8))
    assert batch.x.shape == (6, 3, 16, 16) and batch.x.dtype == torch.float32
    assert batch.x.min() >= -1 and batch.x.max() <= 1
    assert batch.labels.dtype == torch.int64 and batch.low.shape == (6, 3, 8, 8)
    x, labels = data.sample(np.random.default_rng(0), 5)
    assert x.shape == (5, 3, 16, 16) and labels.shape == (5,)


def test_image_folder_flips_horizontally(tmp_path):
    (tmp_path / "only").mkdir()
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = 255  # white left half
    Image.fromarray(img).save(tmp_path / "only" / "half.png")
    data = ImageFolderData(tmp_path, 8)
    x = torch.cat([b.x for _, b in zip(range(20), data.batches(1, 4))])
    left_white = (x[:, :, :, 0] > 0).all(dim=(1, 2))
    assert 0 < left_white.sum() < len(x)  # both orientations occur


def test_image_folder_applies_exif_orientation(tmp_path):
    (tmp_path / "c").mkdir()
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = (255, 0, 0)  # stored: red left half, blue right half
    img[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: red on top
    Image.fromarray(img).save(tmp_path / "c" / "rotated.jpg", exif=exif, quality=95)
    out = ImageFolderData(tmp_path, 20).images[0].astype(int)
    assert out[2, 10, 0] > 200 and out[2, 10, 2] < 60  # top: red
    assert out[17, 10, 2] > 200 and out[17, 10, 0] < 60  # bottom: blue


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderData(tmp_path / "missing", 16)
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderData(tmp_path, 16)
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderData(tmp_path, 16)
    (tmp_path / "cats" / "bad.jpg").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="could be read"):
            ImageFolderData(tmp_path, 16)


# --- bundled photos -----------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_wild_photos_load_offline(no_network):
    wild._load.cache_clear()
    photos = wild.wild_photos()
    assert tuple(photos) == wild.WILD_PHOTO_NAMES
    for name, img in photos.items():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert min(img.shape[:2]) >= 256 and img.std() > 10, name
        assert not img.flags.writeable, name
    assert wild.wild_photo("chelsea") is photos["chelsea"]
    with pytest.raises(KeyError):
        wild.wild_photo("mona_lisa")


def test_crop_and_downscale_helpers():
    img = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    sq = wild.center_crop(img)
    assert sq.shape == (30, 30, 3)
    np.testing.assert_array_equal(sq, img[:, 10:40])
    np.testing.assert_array_equal(wild.center_crop(img, 10), img[10:20, 20:30])
    with pytest.raises(ValueError):
        wild.center_crop(img, 31)
    small = wild.downscale(img, 4)  # 30x50 -> trimmed to 28x48 -> 7x12
    assert small.shape == (7, 12, 3)
    expected = box_down(img[None, :28, :48].astype(np.float64), 4)[0]
    assert np.abs(small - expected).max() <= 1
    assert wild.fit_square(img, 16).shape == (16, 16, 3)
    grey = np.full((8, 8), 0.5)
    np.testing.assert_array_equal(wild.as_rgb_uint8(grey), np.full((8, 8, 3), 128, np.uint8))
    assert wild.as_rgb_uint8(np.zeros((4, 4, 4), np.uint8)).shape == (4, 4, 3)
