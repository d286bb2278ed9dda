"""Every kind of upload, made in tmp_path: refused with a reason, or read as upright uint8 RGB with notes."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from explore.outputs import SampleFileError, load_samples_npz
from explore.uploads import UploadError, read_image
from explore.validate import CPU_CAPS, GPU_CAPS, InputError


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path, width: int, height: int):
    """A valid 1-bit PNG of width x height zeros: a few kB on disk, width * height pixels once decoded."""
    row = b"\0" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body)
                     + png_chunk(b"IEND", b""))
    return path


@pytest.fixture
def decoded(monkeypatch):
    """Counts pixel decodes: ImageFile.load is where every Pillow format decodes its pixels."""
    calls = []
    original = ImageFile.ImageFile.load

    def load(self, *args, **kwargs):
        calls.append(self.size)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def photo(tmp_path, name, image: Image.Image, **save):
    path = tmp_path / name
    image.save(path, **save)
    return path


def gradient(w=40, h=30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), np.full_like(x, 90)], -1).astype(np.uint8)


# --- refused, with a reason ---------------------------------------------------------------------

@pytest.mark.parametrize("side", [20_000, 9_000])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, decoded, side):
    path = bomb_png(tmp_path / "bomb.png", side, side)
    assert path.stat().st_size < 200_000  # tiny on disk
    started = time.perf_counter()
    with pytest.raises(UploadError, match=rf"{side}x{side} .* too large; refused before decoding"):
        read_image(path, CPU_CAPS)
    assert time.perf_counter() - started < 1.0 and decoded == []


def test_pillow_guard_stays_on_above_every_cap(tmp_path, decoded):
    path = bomb_png(tmp_path / "huge.png", 65_535, 65_535)  # 4.3 gigapixels: Pillow itself refuses to open it
    with pytest.raises(UploadError, match="too large|more pixels than Pillow allows"):
        read_image(path, GPU_CAPS)
    assert decoded == []


@pytest.mark.parametrize("content,message", [
    (b"", "the file is empty"),
    (b"hello, this is text, not a picture\n" * 10, "not an image this app reads"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image this app reads"),  # no EPS decoder
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "truncated or corrupt|not an image"),
])
def test_non_images_are_refused(tmp_path, content, message):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with pytest.raises(UploadError, match=message):
        read_image(path)


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("GIF", "gif")])
def test_truncated_and_corrupt_files_are_refused(tmp_path, fmt, suffix):
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(noisy).save(data, format=fmt)
    whole = data.getvalue()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UploadError, match="truncated or corrupt"):
        read_image(cut)
    if fmt == "PNG":  # a flipped byte inside the pixel data: the chunk checksum no longer fits
        flipped = bytearray(whole)
        flipped[len(whole) // 2] ^= 0xFF
        bad = tmp_path / "flipped.png"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(UploadError, match="truncated or corrupt"):
            read_image(bad)


def test_files_over_the_byte_cap_are_refused_unread(tmp_path, decoded):
    path = tmp_path / "big.png"
    path.write_bytes(b"\x89PNG" + b"\0" * (CPU_CAPS.upload_bytes + 1 - 4))
    with pytest.raises(UploadError, match=r"larger than the 32 MiB accepted per upload"):
        read_image(path, CPU_CAPS)
    assert decoded == []


def test_long_sides_are_capped_by_the_device(tmp_path):
    path = bomb_png(tmp_path / "strip.png", 10_000, 2)  # few pixels, but wider than the CPU cap allows
    with pytest.raises(UploadError, match="up to 8192 px a side"):
        read_image(path, CPU_CAPS)
    assert read_image(path, GPU_CAPS).pixels.shape == (2, 10_000, 3)


def test_upload_error_is_an_input_error():
    assert issubclass(UploadError, InputError) and issubclass(UploadError, ValueError)


# --- read, with notes ---------------------------------------------------------------------------

def test_rgb_photo_is_read_unchanged(tmp_path):
    pixels = gradient()
    result = read_image(photo(tmp_path, "rgb.png", Image.fromarray(pixels)))
    assert result.notes == [] and result.pixels.dtype == np.uint8
    np.testing.assert_array_equal(result.pixels, pixels)


def test_one_pixel_image_is_read(tmp_path):
    result = read_image(photo(tmp_path, "dot.png", Image.new("RGB", (1, 1), (10, 20, 30))))
    assert result.pixels.shape == (1, 1, 3) and result.pixels[0, 0].tolist() == [10, 20, 30]


def test_greyscale_and_palette(tmp_path):
    grey = read_image(photo(tmp_path, "grey.png", Image.new("L", (5, 4), 77)))
    assert grey.pixels.shape == (4, 5, 3) and (grey.pixels == 77).all() and "greyscale" in grey.notes[0]
    bilevel = read_image(photo(tmp_path, "bits.png", Image.new("1", (5, 4), 1)))
    assert (bilevel.pixels == 255).all()
    palette = Image.fromarray(gradient()).quantize(16)
    result = read_image(photo(tmp_path, "palette.png", palette))
    np.testing.assert_array_equal(result.pixels, np.asarray(palette.convert("RGB")))


def test_transparency_is_shown_on_white(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :3, 3] = 255  # left half opaque red, right half fully transparent
    result = read_image(photo(tmp_path, "rgba.png", Image.fromarray(rgba, "RGBA")))
    assert result.pixels[0, 0].tolist() == [200, 0, 0] and result.pixels[0, 5].tolist() == [255, 255, 255]
    assert "transparent pixels shown on white" in result.notes
    half = read_image(photo(tmp_path, "la.png", Image.new("LA", (3, 3), (0, 128))))
    assert abs(int(half.pixels[0, 0, 0]) - 127) <= 1
    palette = Image.new("P", (3, 3), 0)
    palette.putpalette([0, 0, 0] * 256)
    transparent = read_image(photo(tmp_path, "p.png", palette, transparency=0))
    assert (transparent.pixels == 255).all()


@pytest.mark.parametrize("mode,value,expected", [("I;16", 65535, 255), ("I;16", 257 * 100, 100), ("I", 40_000, 156),
                                                 ("I", 200, 200)])
def test_sixteen_bit_is_scaled_to_eight(tmp_path, mode, value, expected):
    result = read_image(photo(tmp_path, "deep.png", Image.new(mode, (4, 3), value)))
    assert result.pixels.shape == (3, 4, 3) and (result.pixels == expected).all()
    assert any("scaled to 8 bits" in note for note in result.notes)


def test_float_tiff_is_scaled(tmp_path):
    result = read_image(photo(tmp_path, "float.tif", Image.fromarray(np.full((3, 4), 0.5, np.float32), "F")))
    assert (result.pixels == 128).all() and "32-bit float" in result.notes[0]


def test_cmyk_jpeg_and_tiff(tmp_path):
    for name in ("cmyk.jpg", "cmyk.tif"):
        result = read_image(photo(tmp_path, name, Image.new("CMYK", (8, 8), (0, 0, 0, 0))))
        assert result.pixels.shape == (8, 8, 3) and (result.pixels > 240).all() and "CMYK" in result.notes[0]


def test_animated_gif_and_webp_use_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    for name in ("anim.gif", "anim.webp"):
        path = photo(tmp_path, name, frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0,
                     **({"lossless": True} if name.endswith("webp") else {}))
        result = read_image(path)
        assert result.pixels.shape == (6, 6, 3) and result.pixels[0, 0, 0] > 200 and result.pixels[0, 0, 1] < 50
        assert any("3 frames): the first frame is used" in note for note in result.notes), result.notes


def test_exif_rotation_is_applied(tmp_path):
    pixels = gradient(40, 30)  # landscape as stored
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    result = read_image(photo(tmp_path, "rotated.jpg", image, exif=exif.tobytes(), quality=95))
    assert result.pixels.shape == (40, 30, 3)  # portrait once upright
    assert "turned upright as its EXIF orientation says" in result.notes
    expected = np.asarray(Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270))
    assert np.abs(result.pixels.astype(int) - expected).mean() < 4  # JPEG loss only


# --- sample files (.npz) ------------------------------------------------------------------------

def npz(tmp_path, **arrays):
    path = tmp_path / "upload.npz"
    np.savez(path, **arrays)
    return path


def test_npz_layouts_dtypes_and_missing_labels(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for arrays in ({"arr_0": images}, {"arr_0": images.transpose(0, 3, 1, 2)},
                   {"arr_0": images.astype(np.float32) / 127.5 - 1}, {"arr_0": images.astype(np.float64) / 255},
                   {"arr_0": images.astype(np.float32)}, {"images": images, "labels": np.array([0, 1, 2])}):
        loaded, labels = load_samples_npz(npz(tmp_path, **arrays))
        np.testing.assert_array_equal(loaded, images)
        assert labels is None if "labels" not in arrays else labels.tolist() == [0, 1, 2]
    loaded, _ = load_samples_npz(npz(tmp_path, arr_0=images[..., :1].transpose(0, 3, 1, 2)))  # grey NCHW
    assert loaded.shape == (3, 8, 8, 3)


@pytest.mark.parametrize("arrays,message", [
    ({"arr_0": np.array([{"evil": 1}], dtype=object)}, "pickled Python objects, which are refused"),
    ({"arr_0": np.zeros((2, 8, 8, 3), bool)}, "must be numbers"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.complex64)}, "must be numbers"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.uint16) + 4000}, "0..255"),
    ({"arr_0": np.full((2, 8, 8, 3), 1e6, np.float32)}, r"float images must lie in \[-1, 1\], \[0, 1\] or \[0, 255\]"),
    ({"arr_0": np.full((2, 8, 8, 3), -3.0, np.float32)}, "float images must lie in"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.float32) + np.inf}, "NaN or infinity"),
    ({"arr_0": np.zeros(5, np.uint8)}, "must be"),
    ({"arr_0": np.zeros((0, 8, 8, 3), np.uint8)}, "holds 0 images"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.uint8), "arr_1": np.zeros((2, 2), np.int64)}, "labels"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.uint8), "arr_1": np.array(["a", "b"])}, "labels"),
])
def test_npz_uploads_that_cannot_be_used(tmp_path, arrays, message):
    with pytest.raises(SampleFileError, match=message):
        load_samples_npz(npz(tmp_path, **arrays))


def test_npz_that_is_not_an_archive_or_is_cut(tmp_path):
    path = npz(tmp_path, arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 30])
    with pytest.raises(SampleFileError):
        load_samples_npz(path)
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SampleFileError):
        load_samples_npz(path)


# --- the app's upload paths ---------------------------------------------------------------------

def test_lab_reads_uploads_through_the_safe_reader(app_context, tmp_path):
    import gradio as gr

    from explore.ui.upsample_lab import NATIVE, WHOLE, Lab
    lab, up = Lab(app_context), "scenes128_upsampler"
    big = photo(tmp_path, "photo.png", Image.fromarray(np.tile(gradient(200, 150), (1, 1, 1))))
    original, low = lab.photo(None, str(big), up, WHOLE)
    assert original.shape == (128, 128, 3) and low.shape == (32, 32, 3)
    rgba = photo(tmp_path, "rgba.png", Image.new("RGBA", (160, 160), (0, 0, 0, 0)))
    with pytest.warns(UserWarning, match="shown on white"):  # gr.Warning outside a request is a warning
        original, _ = lab.photo(None, str(rgba), up, NATIVE)
    assert (original == 255).all()
    for path, message in [(bomb_png(tmp_path / "bomb.png", 20_000, 20_000), "refused before decoding"),
                          (photo(tmp_path, "dot.png", Image.new("RGB", (1, 1))), r"1x1 px is smaller .* 128x128"),
                          (tmp_path / "missing.png", "cannot be found")]:
        with pytest.raises(gr.Error, match=message):
            lab.photo(None, str(path), up, WHOLE)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(gr.Error, match="not an image"):
        lab.photo(None, str(text), up, WHOLE)
