"""Decoding real images (distgan/data/images.py): transparency, 16-bit, CMYK, palettes, grey, EXIF; the folder
source and `prepare` give the same pixels; folders reached through symbolic links."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from distgan.config import ConfigError, load_config
from distgan.data.folder import FolderImages
from distgan.data.images import list_files, parse_background, square_resize
from distgan.data.prepare import prepare
from distgan.data.shards import tar_samples

HIDDEN = (153, 38, 38)  # what emoji PNGs store in fully transparent pixels


def reopened(image: Image.Image, format: str = "PNG", **save) -> Image.Image:
    """The image written to a file in memory and opened again, as a decoder meets it."""
    buf = io.BytesIO()
    image.save(buf, format=format, **save)
    buf.seek(0)
    return Image.open(buf)


def decoded(image: Image.Image, size: int, mode: str = "RGB", background="white") -> np.ndarray:
    return np.asarray(square_resize(image, size, mode, background)).astype(int)


def sticker(hidden: tuple[int, int, int]) -> Image.Image:
    """40x40 RGBA: an opaque blue disc with a soft (half-transparent) rim; every other pixel fully transparent
    and holding the colour `hidden`."""
    yy, xx = np.mgrid[:40, :40]
    radius = np.hypot(yy - 19.5, xx - 19.5)
    alpha = np.where(radius < 11, 255, np.where(radius < 14, 128, 0)).astype(np.uint8)
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[...] = (*hidden, 0)
    rgba[alpha > 0, :3] = (0, 0, 255)
    rgba[..., 3] = alpha
    return Image.fromarray(rgba, "RGBA")


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand (PIL writes no 48-bit RGB): IHDR, one IDAT of unfiltered rows, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    raw = b"".join(b"\0" + row for row in rows)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_hidden_colours_of_transparent_pixels_never_reach_the_pixels():
    for size in (40, 16, 7):  # as is, and two Lanczos downscales that blend the disc's edge with its surroundings
        red = decoded(reopened(sticker(HIDDEN)), size)
        green = decoded(reopened(sticker((0, 255, 0))), size)
        assert np.array_equal(red, green)  # what transparent pixels store does not matter
        # Blue composited over white: red == green everywhere, edges included (the hidden red would tip red up).
        assert np.abs(red[..., 0] - red[..., 1]).max() <= 1
        assert red[0, 0].tolist() == [255, 255, 255] and red[size // 2, size // 2, 2] == 255
        assert np.array_equal(decoded(reopened(sticker(HIDDEN)), size, "L"), decoded(sticker((0, 255, 0)), size, "L"))
    rim = decoded(reopened(sticker(HIDDEN)), 40)[19, 6]  # alpha 128: half blue, half white
    assert rim.tolist() == [127, 127, 255]
    assert decoded(sticker(HIDDEN), 40, background="black")[0, 0].tolist() == [0, 0, 0]
    assert decoded(sticker(HIDDEN), 40, background="#102030")[0, 0].tolist() == [16, 32, 48]


def test_grey_with_alpha_and_palettes_with_a_transparent_entry_are_composited():
    la = np.zeros((8, 8, 2), np.uint8)  # black, with alpha 0 | 128 | 255 in three bands
    la[:, :3, 1], la[:, 3:5, 1], la[:, 5:, 1] = 0, 128, 255
    image = reopened(Image.fromarray(la, "LA"))
    assert image.mode == "LA"
    assert decoded(image, 8, "L")[0].tolist() == [255] * 3 + [127] * 2 + [0] * 3
    assert decoded(image, 8)[0, 3].tolist() == [127, 127, 127]
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([*HIDDEN, 0, 0, 255] + [0] * 762)
    for x in range(4, 8):
        for y in range(8):
            palette.putpixel((x, y), 1)
    image = reopened(palette, transparency=0)  # index 0 (the hidden red) is transparent
    assert image.mode == "P" and image.info["transparency"] == 0
    pixels = decoded(image, 8)
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 7].tolist() == [0, 0, 255]
    gif = decoded(reopened(palette, "GIF", transparency=0), 8, background="black")
    assert gif[0, 0].tolist() == [0, 0, 0] and gif[0, 7].tolist() == [0, 0, 255]
    grey = reopened(Image.new("L", (8, 8), 40), transparency=40)  # one grey value marked transparent
    assert decoded(grey, 8, "L").max() == 255


def test_16_bit_images_are_scaled_to_8_bits_not_clipped():
    values = np.array([[0, 255, 256, 32768, 40000, 65280, 65535, 1000]] * 8, np.uint16)
    expected = (values >> 8).astype(int)  # 32768 -> 128, 65535 -> 255
    png = reopened(Image.fromarray(values))
    assert png.mode == "I;16"
    assert np.array_equal(decoded(png, 8, "L"), expected)
    assert np.array_equal(decoded(png, 8), np.repeat(expected[..., None], 3, axis=-1))
    big = Image.frombytes("I;16B", (8, 8), values.astype(">u2").tobytes())
    little = Image.frombytes("I;16L", (8, 8), values.astype("<u2").tobytes())
    wide = Image.fromarray(values.astype(np.int32))  # mode I, as TIFFs and older Pillows give 16-bit grey
    for image in (big, little, wide):
        assert np.array_equal(decoded(image, 8, "L"), expected), image.mode
    unit = Image.fromarray((values / 65535).astype(np.float32))  # mode F in [0, 1]
    assert np.abs(decoded(unit, 8, "L") - np.rint(values / 65535 * 255)).max() == 0
    gradient = reopened(Image.fromarray(np.tile(np.arange(0, 65536, 1024, dtype=np.uint16), (64, 1))))
    assert np.array_equal(decoded(gradient, 64, "L")[0], np.arange(0, 256, 4))


def test_16_bit_colour_pngs_keep_the_high_byte():
    rgb48 = np.array([[65535, 32768, 256], [1, 0, 65280]], ">u2").tobytes()
    image = Image.open(io.BytesIO(png_bytes(2, 1, 16, 2, [rgb48])))
    assert image.mode == "RGB"  # Pillow reads 48-bit RGB as 8-bit, by the high byte
    assert np.asarray(image).tolist() == [[[255, 128, 1], [0, 0, 255]]]
    rgba64 = np.array([[0, 0, 65535, 65535], [65535, 0, 0, 0]], ">u2").tobytes()  # blue; a transparent red
    image = Image.open(io.BytesIO(png_bytes(2, 2, 16, 6, [rgba64, rgba64])))
    assert image.mode == "RGBA" and decoded(image, 2)[0].tolist() == [[0, 0, 255], [255, 255, 255]]


def test_cmyk_grey_rgb_and_1_bit_colour_conversions():
    cmyk = reopened(Image.new("CMYK", (8, 8), (10, 200, 30, 5)), "JPEG", quality=95)
    assert cmyk.mode == "CMYK"
    expected = [(255 - c) * (255 - 5) / 255 for c in (10, 200, 30)]  # (240, 54, 221)
    assert np.abs(decoded(cmyk, 8)[4, 4] - expected).max() <= 2
    assert decoded(cmyk, 8, "L").shape == (8, 8)
    grey = decoded(Image.new("L", (8, 8), 77), 4)
    assert grey.shape == (4, 4, 3) and (grey == 77).all()
    assert (decoded(Image.new("RGB", (8, 8), (255, 0, 0)), 4, "L") == 76).all()  # ITU-R 601 luma of red
    assert (decoded(reopened(Image.new("1", (8, 8), 1)), 4) == 255).all()


def test_exif_orientation_is_applied_before_cropping():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue, stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: portrait, red on top
    pixels = decoded(reopened(image, "JPEG", quality=95, exif=exif), 8)
    assert pixels[0, 4, 0] > 200 and pixels[7, 4, 2] > 200


BACKGROUNDS = [("white", (255, 255, 255)), ("black", (0, 0, 0)), ("gray", (128, 128, 128)), ("#ff8000", (255, 128, 0)),
               ("10,20,30", (10, 20, 30)), (" GREY ", (128, 128, 128))]  # fmt: skip


@pytest.mark.parametrize("text, rgb", BACKGROUNDS)
def test_background_settings(text, rgb):
    assert parse_background(text) == rgb


@pytest.mark.parametrize("text", ["whit", "#12345", "1,2", "300,0,0", "#10203040", ""])
def test_a_bad_background_is_refused_naming_the_setting(text, tmp_path):
    with pytest.raises(ConfigError, match="--background must be a colour name"):
        parse_background(text)
    with pytest.raises(ConfigError, match="config key 'data.background' must be a colour name"):
        load_config(None, {"data.background": text})
    with pytest.raises(ConfigError, match="--background must be"):
        prepare(str(tmp_path), str(tmp_path / "out"), background=text, progress=False)


def awkward_folder(root):
    """One file of each kind the decoder must get right, all 40x40 (some 40x24 or 24x40)."""
    root.mkdir(parents=True)
    reopened(sticker(HIDDEN)).save(root / "a_rgba.png")
    la = np.stack([np.full((24, 40), 30, np.uint8), np.tile(np.linspace(0, 255, 40).astype(np.uint8), (24, 1))], -1)
    Image.fromarray(la, "LA").save(root / "b_la.png")
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([*HIDDEN, 0, 200, 0] + [0] * 762)
    palette.paste(1, (10, 10, 30, 30))
    palette.save(root / "c_palette.png", transparency=0)
    Image.fromarray(np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (40, 1))).save(root / "d_gray16.png")
    Image.new("CMYK", (24, 40), (10, 200, 30, 5)).save(root / "e_cmyk.jpg", quality=90)
    rows = [np.tile(np.array([40000, 1000, 65535], ">u2"), 40).tobytes()] * 40
    (root / "f_rgb48.png").write_bytes(png_bytes(40, 40, 16, 2, rows))
    Image.new("1", (40, 40), 1).save(root / "g_bilevel.png")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_the_folder_source_and_prepare_give_the_same_pixels(tmp_path, channels):
    root = awkward_folder(tmp_path / "src")
    folder = FolderImages(str(root), 16, channels, background="#204060")
    prepare(str(root), str(tmp_path / "out"), size=16, format="png", channels=channels, background="#204060",
            workers=2, progress=False)  # fmt: skip
    samples = list(tar_samples(str(tmp_path / "out" / "train-000000.tar")))
    assert len(samples) == len(folder) == 7
    for sample in samples:
        index = int(sample["__key__"])
        from_shard = np.asarray(Image.open(io.BytesIO(sample["png"]))).reshape(16, 16, -1)
        from_folder = folder.load(index).permute(1, 2, 0).numpy()
        assert np.array_equal(from_shard, from_folder), folder.files[index].name
    gray16 = folder.load([f.name for f in folder.files].index("d_gray16.png"))
    assert 100 < int(gray16[0, 8, 8]) < 155  # the middle of a 0..65535 ramp, not clipped to 255
    rgba = folder.load(0).permute(1, 2, 0).numpy()
    assert rgba[0, 0].tolist() == ([32, 64, 96] if channels == 3 else [parse_gray((32, 64, 96))])


def parse_gray(rgb: tuple[int, int, int]) -> int:
    return int(np.asarray(Image.new("RGB", (1, 1), rgb).convert("L"))[0, 0])


def test_folders_reached_through_links_are_followed_and_loops_are_not(tmp_path):
    root, elsewhere = tmp_path / "tree", tmp_path / "elsewhere" / "dogs"
    for folder, colour in ((root / "cats", (200, 0, 0)), (elsewhere, (0, 0, 200))):
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), colour).save(folder / f"{i}.png")
    (root / "dogs").symlink_to(elsewhere, target_is_directory=True)  # a class folder that is a link
    (root / "cats" / "loop").symlink_to(root, target_is_directory=True)  # a link to an ancestor
    (root / "cats" / "dangling").symlink_to(tmp_path / "nowhere")
    names = ["cats/0.png", "cats/1.png", "cats/2.png", "dogs/0.png", "dogs/1.png", "dogs/2.png"]
    assert list_files(root) == names
    folder = FolderImages(str(root), 8, 3)
    assert folder.classes == ["cats", "dogs"] and folder.labels == [0, 0, 0, 1, 1, 1]
    m = prepare(str(root), str(tmp_path / "out"), size=8, progress=False)
    assert m["classes"] == ["cats", "dogs"] and m["num_samples"] == {"train": 6} and m["num_files"] == 6
    dogs = prepare(str(root), str(tmp_path / "dogs"), size=8, include="dogs/*.png", progress=False)
    assert dogs["num_samples"] == {"train": 3} and dogs["num_excluded"] == 3 and dogs["classes"] is None
    (elsewhere / "up").symlink_to(elsewhere.parent, target_is_directory=True)  # a loop through two links
    assert list_files(root) == names


def test_prepare_takes_the_background_as_fire_reads_it_and_records_it(tmp_path):
    (tmp_path / "src").mkdir()
    sticker(HIDDEN).save(tmp_path / "src" / "a.png")
    m = prepare(str(tmp_path / "src"), str(tmp_path / "out"), size=8, format="png", background=(0, 0, 0),
                progress=False)  # fmt: skip
    assert m["background"] == "0,0,0" and m["background_rgb"] == [0, 0, 0]
    sample = next(iter(tar_samples(str(tmp_path / "out" / "train-000000.tar"))))
    assert np.asarray(Image.open(io.BytesIO(sample["png"])))[0, 0].tolist() == [0, 0, 0]
