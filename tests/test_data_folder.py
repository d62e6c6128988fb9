"""Image folder / ZIP loading and the checker (RELIABILITY 17, 19-22)."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_images import (MESSY_BAD, MESSY_COUNTS, MESSY_IGNORED, SIZE, encode, gray16_ramp,
                             make_messy_folder, messy_files, noise_rgb, write_files)
from torchdiffusion.data import (CATEGORIES, check, dataset_fingerprint,
                                 load_image_folder)
from torchdiffusion.config.build import build_dataset
from torchdiffusion.errors import DataError


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    return make_messy_folder(tmp_path_factory.mktemp("messy"))


def _zip(path, files: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_check_counts_every_category(messy):
    r = check(messy)
    assert set(r.counts) == set(CATEGORIES)
    assert r.counts == MESSY_COUNTS
    assert r.ignored == MESSY_IGNORED
    assert [p for p, _, _ in r.bad] == MESSY_BAD
    assert r.files == 13
    assert r.sizes == {(SIZE, SIZE): 8}
    assert "8 ok, 5 bad" in r.one_line()


def test_skip_policy_keeps_usable_files_and_reports(messy):
    ds = load_image_folder(messy, bad_files="skip")
    assert ds.x.dtype == torch.uint8 and tuple(ds.x.shape) == (8, 3, SIZE, SIZE)  # auto: color present
    assert (ds.label == -1).all() and ds.class_names == ()
    assert ds.info["report"].counts == MESSY_COUNTS
    assert "5 bad" in ds.info["skipped"]


def test_error_policy_names_first_bad_file(messy):
    with pytest.raises(DataError) as e:
        load_image_folder(messy, bad_files="error")
    msg = str(e.value)
    assert f"'{MESSY_BAD[0]}'" in msg and "decompression-bomb" in msg and "bad_files='skip'" in msg
    assert "\n" not in msg


def test_16bit_gray_keeps_its_range(tmp_path):
    write_files(tmp_path, {"g16.png": encode(Image.fromarray(gray16_ramp()), "PNG")})
    x = load_image_folder(tmp_path, channels="L").x[0, 0].numpy().astype(np.int64)
    v = gray16_ramp().astype(np.int64)
    expected = (v * 255 + 32767) // 65535  # round(v * 255 / 65535)
    np.testing.assert_array_equal(x, expected)
    assert x.min() == 0 and x.max() == 255 and len(np.unique(x)) > 200  # not clipped to a flat 255


def test_16bit_rgb_keeps_its_range(messy):
    ds = load_image_folder(messy, bad_files="skip", channels="RGB")
    # path order of usable files: cmyk, gray, gray16, palette, rgb_a, rgb_b, rgba, sub/rgb16
    x = ds.x[7].numpy().astype(np.int64)
    v = gray16_ramp().astype(np.int64)
    assert np.abs(x[0] - v / 257.0).max() <= 1.0  # 8-bit value of each 16-bit sample, full range
    assert x.max() == 255 and x.min() == 0


def test_channel_policies(messy):
    ds_l = load_image_folder(messy, bad_files="skip", channels="L")
    ds_rgb = load_image_folder(messy, bad_files="skip", channels="RGB")
    ds_rgba = load_image_folder(messy, bad_files="skip", channels="RGBA")
    assert ds_l.channels == 1 and ds_rgb.channels == 3 and ds_rgba.channels == 4
    gray = ds_rgb.x[1]  # gray.png, constant 77: replicated to 3 equal channels
    assert (gray == 77).all() and (ds_l.x[1] == 77).all()
    # rgba.png: left half transparent -> composited on white (default); right half opaque red 200
    rgba = ds_rgb.x[6]
    assert (rgba[:, :, : SIZE // 2] == 255).all()
    assert (rgba[0, :, SIZE // 2:] == 200).all() and (rgba[1:, :, SIZE // 2:] == 0).all()
    assert (ds_rgba.x[6][3, :, : SIZE // 2] == 0).all() and (ds_rgba.x[1][3] == 255).all()
    # cmyk (0, 255, 255, 0) is red
    cmyk = ds_rgb.x[0].float().mean(dim=(1, 2))
    assert cmyk[0] > 240 and cmyk[1] < 15 and cmyk[2] < 15
    black = load_image_folder(messy, bad_files="skip", channels="RGB", alpha_background=0).x[6]
    assert (black[:, :, : SIZE // 2] == 0).all()


def test_auto_channels_gray_set_is_one_channel(tmp_path):
    g = Image.fromarray(np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE), "L")
    write_files(tmp_path, {"a.png": encode(g, "PNG"), "b.png": encode(g.convert("RGB"), "PNG")})
    ds = load_image_folder(tmp_path)
    assert ds.channels == 1
    assert torch.equal(ds.x[0], ds.x[1])


def test_resize_centre_crops_the_square(tmp_path):
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:40] = (0, 255, 0)
    a[:, 40:] = (0, 0, 255)
    write_files(tmp_path, {"wide.png": encode(Image.fromarray(a, "RGB"), "PNG"),
                           "b.png": encode(noise_rgb(0, (30, 30)), "PNG")})
    ds = load_image_folder(tmp_path, resolution=8, channels="RGB")
    assert tuple(ds.x.shape) == (2, 3, 8, 8)
    wide = ds.x[1]
    assert (wide[1] == 255).all() and (wide[0] == 0).all() and (wide[2] == 0).all()


def test_mixed_sizes_without_resolution_is_an_error(tmp_path):
    write_files(tmp_path, {"a.png": encode(noise_rgb(0, (16, 16)), "PNG"),
                           "b.png": encode(noise_rgb(1, (20, 16)), "PNG")})
    with pytest.raises(DataError, match="resolution"):
        load_image_folder(tmp_path)


def test_exif_orientation_is_applied(tmp_path):
    img = noise_rgb(0, (20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    write_files(tmp_path, {"r.jpg": encode(img, "JPEG", exif=exif.tobytes())})
    assert tuple(load_image_folder(tmp_path).x.shape[2:]) == (20, 10)


def test_pixel_limit_is_local(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    write_files(tmp_path, {"big.png": encode(noise_rgb(0, (40, 40)), "PNG")})
    r = check(tmp_path, max_pixels=1000)
    assert r.counts["decompression-bomb"] == 1 and r.counts["ok"] == 0
    assert Image.MAX_IMAGE_PIXELS == before
    assert check(tmp_path).counts["ok"] == 1


def test_labels_from_first_level_folders(tmp_path):
    write_files(tmp_path, {"dog/1.png": encode(noise_rgb(1), "PNG"), "cat/x/2.png": encode(noise_rgb(2), "PNG"),
                           "cat/3.png": encode(noise_rgb(3), "PNG"), "dog/bad.png": b""})
    ds = load_image_folder(tmp_path, labels="folder", bad_files="skip")
    assert ds.class_names == ("cat", "dog")
    assert ds.label.tolist() == [0, 0, 1]  # cat/3.png, cat/x/2.png, dog/1.png
    write_files(tmp_path, {"loose.png": encode(noise_rgb(4), "PNG")})
    with pytest.raises(DataError, match="loose.png"):
        load_image_folder(tmp_path, labels="folder")


def test_empty_after_filtering_gives_counts(tmp_path):
    write_files(tmp_path, {"a.png": b"", "b.png": b"text", "c.txt": b"x"})
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path, bad_files="skip")
    msg = str(e.value)
    assert "no usable images" in msg and "0 ok" in msg and "1 empty" in msg and "1 not-an-image" in msg


def test_zip_equals_folder_without_extracting(messy, tmp_path):
    z = _zip(tmp_path / "messy.zip", messy_files())
    before = sorted(p.name for p in tmp_path.iterdir())
    assert check(z).counts == MESSY_COUNTS
    a = load_image_folder(messy, bad_files="skip")
    b = build_dataset("folder", path=str(z), bad_files="skip")
    assert dataset_fingerprint(a) == dataset_fingerprint(b)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing extracted


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/abs/evil.png", "..\\evil.png", "C:/evil.png"])
def test_zip_with_escaping_member_is_rejected(tmp_path, name):
    z = _zip(tmp_path / "bad.zip", {"ok.png": encode(noise_rgb(0), "PNG"), name: encode(noise_rgb(1), "PNG")})
    for fn in (check, lambda p: load_image_folder(p, bad_files="skip")):
        with pytest.raises(DataError, match="rejected"):
            fn(z)
    assert not (tmp_path.parent / "evil.png").exists()


def test_zip_member_size_limit(tmp_path):
    z = _zip(tmp_path / "a.zip", {"a.png": encode(noise_rgb(0, (64, 64)), "PNG")})
    assert check(z, max_bytes=100).counts["decompression-bomb"] == 1


def test_not_a_folder_or_zip(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"nope")
    with pytest.raises(DataError, match="neither a folder nor a ZIP"):
        check(tmp_path / "x.tar")
    with pytest.raises(DataError, match="not found"):
        check(tmp_path / "missing")


def test_build_dataset_folder_validation(messy):
    with pytest.raises(DataError, match="did you mean 'resolution'"):
        build_dataset("folder", path=str(messy), resolutoin=8)
    with pytest.raises(DataError, match="needs option 'path'"):
        build_dataset("folder")
    with pytest.raises(DataError, match="valid: auto, L, RGB, RGBA"):
        build_dataset("folder", path=str(messy), channels="rgb")
    with pytest.raises(DataError, match="valid: error, skip"):
        build_dataset("folder", path=str(messy), bad_files="ignore")


@pytest.mark.parametrize("ext,fmt,kw", [("bmp", "BMP", {}), ("tif", "TIFF", {}), ("TIFF", "TIFF", {}),
                                        ("webp", "WEBP", {"lossless": True}), ("gif", "GIF", {}),
                                        ("JPEG", "JPEG", {"quality": 100, "subsampling": 0})])
def test_every_listed_format_decodes(tmp_path, ext, fmt, kw):
    img = noise_rgb(5).quantize(32).convert("RGB")  # 32 colours, so GIF is lossless too
    write_files(tmp_path, {f"a.{ext}": encode(img, fmt, **kw)})
    x = load_image_folder(tmp_path, channels="RGB").x[0].permute(1, 2, 0).numpy().astype(int)
    tol = 3 if fmt == "JPEG" else 0
    assert np.abs(x - np.asarray(img, dtype=int)).mean() <= tol


def test_traits_of_alpha_palette_and_unsupported_modes(tmp_path):
    p = Image.new("P", (SIZE, SIZE), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    la = Image.new("LA", (SIZE, SIZE), (90, 0))
    write_files(tmp_path, {"p.png": encode(p, "PNG", transparency=1), "la.png": encode(la, "PNG"),
                           "f.tif": encode(Image.new("F", (SIZE, SIZE), 0.5), "TIFF")})
    r = check(tmp_path)
    assert (r.counts["ok"], r.counts["unsupported"]) == (2, 1)
    assert (r.counts["palette"], r.counts["rgba"], r.counts["grayscale"]) == (1, 2, 1)
    ds = load_image_folder(tmp_path, bad_files="skip", alpha_background=10)
    assert ds.channels == 1 and (ds.x == 10).all()  # both fully transparent -> the background
