"""Sample files in the original format, PNGs that carry their recipe, and reading image files safely."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from explore.engine import Recipe
from explore.outputs import (SampleFileError, from_uint8, image_grid, load_samples_npz, normalise_images,
                             read_png_recipe, save_png, save_samples_npz, to_uint8)


def original_to_uint8(x):
    """scripts/image_sample.py: ((x + 1) * 127.5).clamp(0, 255).to(uint8), then NCHW -> NHWC."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def test_to_uint8_is_the_original_conversion():
    edges = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0])
    x = torch.cat([edges, torch.randn(3 * 4 * 4 - len(edges))]).view(1, 3, 4, 4)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 4, 4, 3)
    np.testing.assert_array_equal(out, original_to_uint8(x))
    assert out[0, 0, :4, 0].tolist() == [0, 0, 0, 127] and out[0, 1, 2:4, 0].tolist() == [255, 255]
    assert out[0, 1, 1, 0] == 254  # truncation, not rounding


def test_from_uint8_is_the_original_input_scaling():
    images = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
    x = from_uint8(images)
    assert x.shape == (2, 3, 3, 5) and x.dtype == torch.float32
    expected = (torch.from_numpy(images).float() / 127.5 - 1.0).permute(0, 3, 1, 2)  # super_res_sample.py
    assert torch.equal(x, expected)
    # the way back truncates like the original, so float error can cost one level; reading floats rounds
    np.testing.assert_array_equal(to_uint8(x), original_to_uint8(x))
    assert np.abs(to_uint8(x).astype(int) - images).max() <= 1
    np.testing.assert_array_equal(normalise_images(x.numpy()), images)


@pytest.mark.parametrize("labels", [None, np.array([3, 0, 7])])
def test_sample_file_is_arr_0_images_and_arr_1_labels(tmp_path, labels):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    path = save_samples_npz(tmp_path / "samples_3x8x8x3.npz", images, labels)
    with np.load(path, allow_pickle=False) as data:
        assert data.files == (["arr_0"] if labels is None else ["arr_0", "arr_1"])
        np.testing.assert_array_equal(data["arr_0"], images)
        if labels is not None:
            assert data["arr_1"].dtype == np.int64 and data["arr_1"].tolist() == labels.tolist()
    loaded, loaded_labels = load_samples_npz(path)
    np.testing.assert_array_equal(loaded, images)
    assert (loaded_labels is None) == (labels is None)


def test_nchw_floats_and_grey_images_are_normalised(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "nchw.npz", images.transpose(0, 3, 1, 2), np.array([1, 2]))
    loaded, labels = load_samples_npz(tmp_path / "nchw.npz")
    np.testing.assert_array_equal(loaded, images)
    assert labels.tolist() == [1, 2]
    x = from_uint8(images).numpy()  # [-1, 1] NCHW floats
    np.testing.assert_array_equal(normalise_images(x), images)
    np.testing.assert_array_equal(normalise_images(images / 255.0), images)
    np.testing.assert_array_equal(normalise_images(images.astype(np.float32) * 1.0), images)
    grey = normalise_images(images[..., :1])
    assert grey.shape == (2, 6, 6, 3) and (grey[..., 0] == grey[..., 2]).all()
    np.save(tmp_path / "images.npy", images)
    loaded, labels = load_samples_npz(tmp_path / "images.npy")
    assert labels is None and np.array_equal(loaded, images)


@pytest.mark.parametrize("arrays,message", [
    ({"arr_0": np.array([{"evil": 1}], dtype=object)}, "pickled"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.uint8), "arr_1": np.array([1])}, r"labels \(arr_1\) must be 2 integers"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.uint8), "arr_1": np.array([0.5, 1.0])}, "labels"),
    ({"arr_0": np.full((1, 4, 4, 3), np.nan, np.float32)}, "NaN"),
    ({"arr_0": np.full((1, 4, 4, 3), 300, np.int32)}, "0..255"),
    ({"arr_0": np.zeros((1, 1, 4, 4, 3), np.uint8)}, "must be"),
    ({"arr_0": np.zeros((1, 4, 4, 5), np.uint8)}, "colour channels"),
    ({"arr_0": np.array(["a", "b"])}, "must be numbers"),
])
def test_unusable_sample_files_are_refused_with_a_reason(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(SampleFileError, match=message):
        load_samples_npz(path)


def test_corrupt_and_oversized_files(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(SampleFileError, match="not an .npz archive"):
        load_samples_npz(tmp_path / "text.npz")
    np.savez(tmp_path / "ok.npz", np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(SampleFileError, match="larger than"):
        load_samples_npz(tmp_path / "ok.npz", max_bytes=1000)
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleFileError):
        load_samples_npz(tmp_path / "cut.npz")


def test_grid_layout_and_nearest_enlargement():
    images = np.stack([np.full((2, 3, 3), 40 * (i + 1), np.uint8) for i in range(3)])
    grid = np.asarray(image_grid(images, scale=2))
    assert grid.shape == (8, 12, 3)  # 2 x 2 cells of 4 x 6 px, the fourth empty
    assert grid[0, 0, 0] == 40 and grid[0, 6, 0] == 80 and grid[4, 0, 0] == 120 and grid[4, 6, 0] == 0
    assert (grid[:4, :6] == 40).all()


def test_png_carries_its_recipe(tmp_path):
    recipe = Recipe(model="tiny", class_label=2, sampler="ddim", respacing="ddim25", cfg_scale=1.5, seed=9)
    path = save_png(image_grid(np.zeros((1, 4, 4, 3), np.uint8)), tmp_path / "grid.png", recipe.to_json(),
                    {"labels": [2], "command": recipe.cli_command()})
    assert Recipe.from_json(read_png_recipe(path)) == recipe
    assert Recipe.from_json(read_png_recipe(path.read_bytes())) == recipe
    with Image.open(path) as img:
        assert json.loads(img.text["labels"]) == [2] and img.text["command"].startswith("python -m explore sample")
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    assert read_png_recipe(buffer.getvalue()) is None
