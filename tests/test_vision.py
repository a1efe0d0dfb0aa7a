"""Image decoding and preprocessing for the vision encoder (rkllm_api.vision), ending
with the whole path through the compiled librknnrt double."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy
import pytest
from PIL import Image

import rknn_ctypes as rn
from rkllm_api import vision as v
from support.rknn_double import make_fake_rknn_model

RED, GREEN, BLUE, WHITE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (128,) * 3


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def quadrants(width: int, height: int) -> Image.Image:
    """Top-left red, top-right green, bottom-left blue, bottom-right white: any flip,
    turn or misplaced padding shows."""
    image = Image.new("RGB", (width, height))
    half_w, half_h = width // 2, height // 2
    for box, colour in (((0, 0, half_w, half_h), RED), ((half_w, 0, width, half_h), GREEN),
                        ((0, half_h, half_w, height), BLUE),
                        ((half_w, half_h, width, height), WHITE)):
        image.paste(colour, box)
    return image


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body)))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height whose only pixel data is 8 bytes of garbage."""
    return (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", b"\x00" * 8))


def close_to(pixel, colour, tolerance=0) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, colour))


# ------------------------------------------------------------------ the bytes


def test_a_data_url_gives_back_the_bytes_even_wrapped_and_unpadded():
    data = encode(quadrants(8, 8), "PNG")
    encoded = base64.b64encode(data).decode().rstrip("=")
    wrapped = "\n".join(encoded[i:i + 60] for i in range(0, len(encoded), 60))
    assert v.image_bytes(f"data:image/png;base64,{wrapped}") == data
    assert v.image_bytes(data) == data


@pytest.mark.parametrize("url,reason", [
    ("https://example.com/cat.png", "not a data URL"),
    ("data:text/plain;base64,aGVsbG8=", "'text/plain', not an image"),
    ("data:image/png,%89PNG", "not base64-encoded"),
    ("data:image/png;base64,@@not base64@@", "base64 is invalid"),
    ("data:image/png;base64,", "the image is empty"),
])
def test_a_wrong_data_url_says_which_image_and_why(url, reason):
    with pytest.raises(v.ImageError) as caught:
        v.image_bytes(url, index=2)
    assert caught.value.index == 2
    assert str(caught.value).startswith("image 2: ")
    assert reason in str(caught.value)


def test_the_byte_limit_is_checked_before_base64_is_decoded():
    limits = v.ImageLimits(max_bytes=1000)
    with pytest.raises(v.ImageError, match="1001 bytes is over the limit of 1000"):
        v.image_bytes(b"x" * 1001, limits=limits)
    with pytest.raises(v.ImageError, match="about .* bytes is over the limit"):
        v.image_bytes("data:image/png;base64," + "A" * 4000 + "!!", limits=limits)


# --------------------------------------------------------------------- decoding


@pytest.mark.parametrize("fmt,tolerance", [("JPEG", 8), ("PNG", 0), ("WEBP", 0), ("GIF", 0)])
def test_each_format_decodes_to_upright_rgb(fmt, tolerance):
    options = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    image = v.open_image(encode(quadrants(40, 20), fmt, **options))
    assert image.mode == "RGB" and image.size == (40, 20)
    for (x, y), colour in (((5, 5), RED), ((35, 5), GREEN), ((5, 15), BLUE), ((35, 15), WHITE)):
        assert close_to(image.getpixel((x, y)), colour, tolerance), (fmt, x, y)


@pytest.mark.parametrize("orientation,top_left,size", [
    (3, WHITE, (40, 20)),  # turned 180 degrees
    (6, BLUE, (20, 40)),   # the camera was turned right: rotate 90 clockwise
    (8, GREEN, (20, 40)),  # turned left: rotate 90 counter-clockwise
    (2, GREEN, (40, 20)),  # mirrored left to right
    (4, BLUE, (40, 20)),   # mirrored top to bottom
    (5, RED, (20, 40)),    # mirrored along the main diagonal
    (7, WHITE, (20, 40)),  # mirrored along the other diagonal
])
def test_exif_orientation_is_applied(orientation, top_left, size):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(quadrants(40, 20), "JPEG", quality=95, exif=exif.tobytes())
    image = v.open_image(data)
    assert image.size == size
    assert close_to(image.getpixel((3, 3)), top_left, 8)


def test_a_malformed_exif_block_still_gives_the_upright_image():
    """Orientation 6 beside a known tag stored with the wrong type (XResolution as
    text): Pillow parses the block but cannot write it back, which its
    exif_transpose does (a TypeError, a 500); the orientation must still apply."""
    entries = (struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)            # Orientation: SHORT 6
               + struct.pack("<HHI", 0x011A, 2, 4) + b"abc\0")     # XResolution: ASCII
    block = b"Exif\0\0II*\0" + struct.pack("<IH", 8, 2) + entries + b"\0" * 4
    image = v.open_image(encode(quadrants(40, 20), "JPEG", quality=95, exif=block))
    assert image.size == (20, 40) and close_to(image.getpixel((3, 3)), BLUE, 8)


def test_a_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (10, 10), RED), Image.new("RGB", (10, 10), BLUE)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(out.getvalue())).n_frames == 2
    image = v.open_image(out.getvalue())
    assert image.getpixel((5, 5)) == RED


def test_transparency_is_flattened_onto_white():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 5, 10))
    image = v.open_image(encode(rgba, "PNG"))
    assert image.getpixel((2, 5)) == BLUE and image.getpixel((8, 5)) == WHITE
    gif = v.open_image(encode(rgba.convert("P", palette=Image.Palette.ADAPTIVE), "GIF",
                              transparency=0))
    assert gif.mode == "RGB"


def test_other_modes_and_an_animated_webp_decode_to_rgb():
    """CMYK JPEG, greyscale with alpha, a palette PNG with a transparent index and an
    animated WebP (its first frame): what phones, editors and chat apps send."""
    cmyk = v.open_image(encode(Image.new("RGB", (8, 8), RED).convert("CMYK"), "JPEG"))
    assert close_to(cmyk.getpixel((4, 4)), RED, 8)
    la = Image.new("LA", (8, 8), (0, 255))
    la.paste((0, 0), (4, 0, 8, 8))
    la = v.open_image(encode(la, "PNG"))
    assert la.getpixel((1, 4)) == (0, 0, 0) and la.getpixel((6, 4)) == WHITE
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette(list(RED) + list(BLUE))
    palette.paste(1, (4, 0, 8, 8))
    palette = v.open_image(encode(palette, "PNG", transparency=1))
    assert palette.getpixel((1, 4)) == RED and palette.getpixel((6, 4)) == WHITE
    out = io.BytesIO()
    Image.new("RGB", (8, 8), GREEN).save(out, "WEBP", save_all=True, lossless=True,
                                         append_images=[Image.new("RGB", (8, 8), BLUE)])
    assert close_to(v.open_image(out.getvalue()).getpixel((4, 4)), GREEN, 2)


@pytest.mark.parametrize("size", [(1, 1), (1, 20000), (20000, 1)])
def test_extreme_sizes_still_fill_the_encoder(size):
    pixels = v.preprocess(encode(Image.new("RGB", size, RED), "PNG"), v.EncoderInput(32, 32))
    assert pixels.shape == (1, 32, 32, 3)
    assert (pixels[0] == RED).all(axis=-1).any()          # the content is there
    if size != (1, 1):
        assert (pixels[0] == GREY).all(axis=-1).any()     # padded, not stretched


def test_sixteen_bit_greyscale_keeps_its_shades():
    ramp = numpy.array([[0, 256 * 64, 256 * 128, 65535]], dtype=numpy.uint16)
    image = v.open_image(encode(Image.fromarray(ramp), "PNG"))
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0,) * 3, (64,) * 3, (128,) * 3,
                                                           (255,) * 3]


@pytest.mark.parametrize("data", [encode(quadrants(8, 8), "BMP"), b"plain text, no image",
                                  encode(quadrants(8, 8), "TIFF")])
def test_other_formats_are_refused(data):
    with pytest.raises(v.ImageError, match="image 3: not a JPEG, PNG, WebP or GIF image"):
        v.open_image(data, index=3)


def test_a_bomb_is_refused_from_its_header_before_decoding():
    # 81 megapixels declared, no pixel data: decoding would fail as truncated, so the
    # pixel-count message proves the header was judged first. 81 MP is under Pillow's
    # own MAX_IMAGE_PIXELS, so this is the module's check, not Pillow's.
    assert 9000 * 9000 < Image.MAX_IMAGE_PIXELS
    with pytest.raises(v.ImageError, match="9000x9000 is 81000000 pixels, over the limit"):
        v.open_image(png_header_only(9000, 9000), index=1)


def test_a_huge_bomb_is_refused_too():
    with pytest.raises(v.ImageError, match="image 0: too many pixels"):
        v.open_image(png_header_only(100_000, 100_000))


def test_the_pixel_limit_is_the_modules_own():
    data = encode(quadrants(100, 100), "PNG")
    with pytest.raises(v.ImageError, match="100x100 is 10000 pixels, over the limit of 9999"):
        v.open_image(data, limits=v.ImageLimits(max_pixels=9999))
    assert v.open_image(data, limits=v.ImageLimits(max_pixels=10000)).size == (100, 100)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_data_is_a_clean_error(fmt):
    noisy = Image.fromarray(numpy.random.default_rng(1).integers(0, 256, (64, 64, 3),
                                                                 dtype=numpy.uint8))
    data = encode(noisy, fmt)
    with pytest.raises(v.ImageError, match=f"image 1: truncated or corrupt {fmt} data"):
        v.open_image(data[:len(data) // 2], index=1)


# ------------------------------------------------------ padding, resizing, layout


def test_a_wide_image_gets_grey_bands_above_and_below():
    fitted = numpy.asarray(v.fit_to_encoder(quadrants(200, 100), 64, 64))
    assert fitted.shape == (64, 64, 3)
    assert (fitted[:16] == 128).all() and (fitted[48:] == 128).all()
    assert close_to(fitted[20, 5], RED) and close_to(fitted[20, 60], GREEN)
    assert close_to(fitted[44, 5], BLUE) and close_to(fitted[44, 60], WHITE)


def test_a_tall_image_gets_grey_bands_left_and_right():
    fitted = numpy.asarray(v.fit_to_encoder(quadrants(50, 100), 32, 32))
    assert (fitted[:, :8] == 128).all() and (fitted[:, 24:] == 128).all()
    assert close_to(fitted[2, 9], RED) and close_to(fitted[30, 22], WHITE)


def test_a_non_square_encoder_keeps_the_aspect_ratio():
    fitted = v.fit_to_encoder(Image.new("RGB", (100, 100), RED), 40, 20)
    assert fitted.size == (40, 20)
    pixels = numpy.asarray(fitted)
    assert (pixels[:, :10] == 128).all() and close_to(pixels[10, 20], RED)


def test_uint8_nhwc_is_the_pixels_unchanged():
    image = quadrants(16, 16)
    array = v.to_encoder_array(image, v.EncoderInput(16, 16, 3, "NHWC", "uint8"))
    assert array.dtype == numpy.uint8 and array.shape == (1, 16, 16, 3)
    assert (array[0] == numpy.asarray(image)).all()


def test_float32_nchw_is_normalised_per_channel():
    image = Image.new("RGB", (4, 4), (255, 0, 51))
    norm = v.Normalisation((0.5, 0.25, 0.2), (0.5, 0.25, 0.1))
    array = v.to_encoder_array(image, v.EncoderInput(4, 4, 3, "NCHW", "float32"), norm)
    assert array.dtype == numpy.float32 and array.shape == (1, 3, 4, 4)
    numpy.testing.assert_allclose(array[0, :, 0, 0], [1.0, -1.0, 0.0], atol=1e-6)
    plain = v.to_encoder_array(image, v.EncoderInput(4, 4, 3, "NCHW", "float32"))
    numpy.testing.assert_allclose(plain[0, :, 2, 2], [1.0, 0.0, 0.2], atol=1e-6)


def test_a_large_jpeg_is_read_in_draft_mode_and_still_fills_the_encoder():
    photo = quadrants(4000, 3000)
    image = v.open_image(encode(photo, "JPEG", quality=90), draft_size=(448, 448))
    assert image.size == (500, 375)  # 1/8 scale: still covers 448 x 336 of content
    fitted = numpy.asarray(v.fit_to_encoder(image, 448, 448))
    assert (fitted[:56] == 128).all() and close_to(fitted[100, 100], RED, 8)


def test_too_many_images_are_refused_before_any_is_decoded():
    with pytest.raises(v.ImageError, match="image 4: 5 images in the request, over the limit"):
        v.preprocess_all(["not even a data URL"] * 5, v.EncoderInput(8, 8))


def test_the_error_names_the_bad_image_among_good_ones():
    good = data_url(encode(quadrants(8, 8), "PNG"))
    bad = data_url(b"GIF89a broken", "image/gif")
    with pytest.raises(v.ImageError, match="^image 1: "):
        v.preprocess_all([good, bad, good], v.EncoderInput(8, 8))


# --------------------------------------------------------------- model families


@pytest.mark.parametrize("name,family,start,end,content", [
    ("Qwen2-VL-2B-Instruct", "qwen2-vl", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"),
    ("qwen2.5-vl-3b-instruct", "qwen2.5-vl", "<|vision_start|>", "<|vision_end|>",
     "<|image_pad|>"),
    ("Qwen2_5-VL-7B", "qwen2.5-vl", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"),
    ("qwen3-vl-4b-instruct", "qwen3-vl", "<|vision_start|>", "<|vision_end|>",
     "<|image_pad|>"),
    ("InternVL3-1B", "internvl", "<img>", "</img>", "<IMG_CONTEXT>"),
    ("MiniCPM-V-2_6", "minicpm-v", "<image>", "</image>", "<unk>"),
    ("minicpm-o-2_6", "minicpm-v", "<image>", "</image>", "<unk>"),
    ("gemma-3-4b-it", "gemma3", "<start_of_image>", "<end_of_image>", "<image_soft_token>"),
])
def test_image_tokens_follow_the_family(name, family, start, end, content):
    assert v.vision_family(name).name == family
    assert v.image_tokens(name) == v.ImageTokens(start, end, content)


@pytest.mark.parametrize("name", ["qwen3-1.7b", "minicpm3-4b", "llama-3.2-3b", "gemma-2-2b"])
def test_text_only_families_have_no_image_tokens(name):
    assert v.vision_family(name) is None and v.image_tokens(name) is None


def test_model_config_overrides_the_image_tokens():
    tokens = v.image_tokens("qwen2-vl-2b", {"image_tokens": {"content": "<|placeholder|>"}})
    assert tokens == v.ImageTokens("<|vision_start|>", "<|vision_end|>", "<|placeholder|>")
    custom = {"image_tokens": {"start": "<a>", "end": "</a>", "content": "<x>"}}
    assert v.image_tokens("my-own-vlm", custom) == v.ImageTokens("<a>", "</a>", "<x>")
    with pytest.raises(ValueError, match="needs all of start, end and content"):
        v.image_tokens("my-own-vlm", {"image_tokens": {"start": "<a>"}})
    with pytest.raises(ValueError, match="must be an object"):
        v.image_tokens("qwen2-vl", {"image_tokens": {"begin": "<a>"}})


def test_normalisation_comes_from_the_config_then_the_family():
    assert v.normalisation_for("InternVL3-1B").mean == (0.485, 0.456, 0.406)
    assert v.normalisation_for("gemma-3-4b-it").std == (0.5, 0.5, 0.5)
    assert v.normalisation_for("unknown-model") is None
    custom = v.normalisation_for("internvl3", {"image_mean": [0.1, 0.2, 0.3]})
    assert custom == v.Normalisation((0.1, 0.2, 0.3), (0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="not in 0-1 units"):
        v.normalisation_for("qwen2-vl", {"image_mean": [123.7, 116.3, 103.5]})
    with pytest.raises(ValueError, match="three values"):
        v.normalisation_for("qwen2-vl", {"image_std": [0.5]})


# ------------------------------------------------- end to end through the double


def encoder_for(tmp_path, lib, **attributes) -> rn.RknnEncoder:
    return rn.RknnEncoder(make_fake_rknn_model(tmp_path, **attributes), lib_path=lib)


def patch_grid(output: numpy.ndarray, grid: int) -> numpy.ndarray:
    """The double's output as grid x grid patches of per-channel means."""
    return output.reshape(grid, grid, -1)[:, :, :3]


def test_a_wide_png_reaches_the_encoder_padded_and_resized(tmp_path, rknn_double_lib):
    with encoder_for(tmp_path, rknn_double_lib, h=64, w=64, layout="NHWC", type="uint8",
                     out="64x8") as encoder:
        url = data_url(encode(quadrants(400, 200), "PNG"))
        (pixels,) = v.preprocess_all([url], encoder.input_spec)
        patches = patch_grid(encoder.encode(pixels), 8)  # 8 x 8 patches of 8 x 8 pixels
    # 400x200 -> 64x32 of content centred in 64x64: patch rows 0-1 and 6-7 are grey
    for row in (0, 1, 6, 7):
        assert numpy.allclose(patches[row], 128), row
    # away from the colour boundaries (patch column 3|4, row 3|4) the colours are exact
    for row, left, right in ((2, RED, GREEN), (5, BLUE, WHITE)):
        for col in (0, 1, 2):
            assert numpy.allclose(patches[row, col], left, atol=0.5), (row, col)
        for col in (5, 6, 7):
            assert numpy.allclose(patches[row, col], right, atol=0.5), (row, col)


def test_an_exif_turned_jpeg_reaches_the_encoder_upright(tmp_path, rknn_double_lib):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 400x200, shown 200x400: the grey bands go left and right
    data = encode(quadrants(400, 200), "JPEG", quality=95, exif=exif.tobytes())
    with encoder_for(tmp_path, rknn_double_lib, h=64, w=64, out="64x8") as encoder:
        patches = patch_grid(encoder.encode(v.preprocess(data, encoder.input_spec)), 8)
    for col in (0, 1, 6, 7):
        assert numpy.allclose(patches[:, col], 128, atol=1), col
    # rotated clockwise: bottom-left blue is now top-left, top-left red top-right
    assert numpy.allclose(patches[0, 2], BLUE, atol=12)
    assert numpy.allclose(patches[0, 5], RED, atol=12)
    assert numpy.allclose(patches[7, 2], WHITE, atol=12)
    assert numpy.allclose(patches[7, 5], GREEN, atol=12)


def test_float_nchw_encoder_gets_normalised_planes(tmp_path, rknn_double_lib):
    norm = v.normalisation_for("qwen2-vl-2b")
    with encoder_for(tmp_path, rknn_double_lib, h=64, w=64, layout="NCHW", type="float16",
                     out="64x4") as encoder:
        assert encoder.input_spec.dtype == "float32"
        pixels = v.preprocess(encode(quadrants(100, 50), "PNG"), encoder.input_spec, norm)
        assert pixels.shape == (1, 3, 64, 64)
        patches = patch_grid(encoder.encode(pixels), 8)
    expected_grey = (128 / 255 - numpy.array(norm.mean)) / numpy.array(norm.std)
    expected_red = (numpy.array(RED) / 255 - numpy.array(norm.mean)) / numpy.array(norm.std)
    assert numpy.allclose(patches[0, 0], expected_grey, atol=1e-4)
    assert numpy.allclose(patches[7, 7], expected_grey, atol=1e-4)
    assert numpy.allclose(patches[2, 0], expected_red, atol=1e-4)
    # and every patch is exactly the mean of the array that was sent
    planes = pixels[0].transpose(1, 2, 0).reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))
    numpy.testing.assert_allclose(patches, planes, rtol=1e-5, atol=1e-5)
