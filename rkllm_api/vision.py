"""Images for vision-language models: from what a client sends to what the encoder takes.

The path of one image:
  1. its bytes: a data URL (`data:image/png;base64,...`, what Open WebUI sends) or raw
     bytes; the byte limit is checked before base64 is decoded;
  2. opened with Pillow as JPEG, PNG, WebP or GIF only; the pixel count in the header
     is checked before anything is decoded (a decompression bomb declares its size
     there, and Pillow's own MAX_IMAGE_PIXELS only warns below twice its value);
  3. decoded: the first frame, EXIF orientation applied, transparency flattened onto
     white, RGB;
  4. padded (centred, grey 128) to the encoder's aspect ratio and resized to its input
     size; for the square encoders of VL models this is "pad to a square, resize";
  5. laid out as the encoder reports: NHWC or NCHW, uint8 pixels (quantised encoders
     carry their mean/std inside) or float32 normalised with the model's mean/std.

Also the per-family image tokens (start, end, content) that librkllmrt places around
the image embeddings in the prompt, chosen by model name and overridable per model.

Nothing here touches the NPU: the encoder itself is rknn_ctypes.RknnEncoder, whose
`input_spec` (height, width, channels, layout, dtype) is what preprocess() takes.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from rkllm_api.runtimes.base import ImageTags

PAD_COLOUR = (128, 128, 128)        # neutral grey: no bias towards dark or light content
ALPHA_BACKGROUND = (255, 255, 255)  # transparent screenshots and diagrams mean "on white"
FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
LAYOUTS = ("NHWC", "NCHW")
DTYPES = ("uint8", "float32")


class ImageError(ValueError):
    """An image of a request cannot be used; says which one and why."""

    def __init__(self, index: int, reason: str):
        self.index = index
        self.reason = reason
        super().__init__(f"image {index}: {reason}")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024   # per image, decoded bytes
    max_pixels: int = 50_000_000        # per image: a 48 MP phone photo passes
    max_images: int = 4                 # per request: each image costs hundreds of tokens


@dataclass(frozen=True)
class EncoderInput:
    """What the encoder takes; rknn_ctypes.InputSpec has the same attributes and can
    be passed wherever this is expected."""
    height: int
    width: int
    channels: int = 3
    layout: str = "NHWC"
    dtype: str = "uint8"


# ================================================================ 1. the bytes

_DATA_URL = re.compile(r"data:(?P<media>[^;,]*)(?P<params>(?:;[^;,]*)*),", re.IGNORECASE)


def image_bytes(source, index: int = 0, limits: ImageLimits = ImageLimits()) -> bytes:
    """The bytes of one image given as a data URL (str) or as bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, str):
        data = _decode_data_url(source.strip(), index, limits)
    else:
        raise ImageError(index, f"expected a data URL or bytes, got {type(source).__name__}")
    if not data:
        raise ImageError(index, "the image is empty")
    if len(data) > limits.max_bytes:
        raise ImageError(index, f"{len(data)} bytes is over the limit of {limits.max_bytes}")
    return data


def _decode_data_url(url: str, index: int, limits: ImageLimits) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        shown = url[:40] + ("..." if len(url) > 40 else "")
        raise ImageError(index, f"not a data URL ({shown!r}); images must be sent inline as "
                                "data:image/...;base64,...")
    media = match.group("media").strip().lower()
    if media and not media.startswith("image/"):
        raise ImageError(index, f"the data URL holds {media!r}, not an image")
    if "base64" not in [p.strip().lower() for p in match.group("params").split(";")]:
        raise ImageError(index, "the data URL is not base64-encoded")
    payload = url[match.end():]
    if any(space in payload for space in " \n\r\t"):  # wrapped base64 (MIME style)
        payload = "".join(payload.split())  # ~10x faster than a regex on megabytes
    # 4 characters carry 3 bytes: refuse an oversized image before decoding it
    if len(payload) // 4 * 3 > limits.max_bytes + 3:
        raise ImageError(index, f"about {len(payload) // 4 * 3} bytes is over the limit of "
                                f"{limits.max_bytes}")
    try:
        if len(payload) % 4:  # clients that drop the padding
            payload += "=" * (-len(payload) % 4)
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(index, f"the data URL's base64 is invalid ({exc})") from None


# ============================================================ 2. and 3. decoding


def open_image(data: bytes, index: int = 0, limits: ImageLimits = ImageLimits(),
               draft_size: Optional[tuple] = None):
    """The image in data as an RGB PIL image, upright (EXIF orientation applied).

    draft_size (width, height): the smallest size the caller will need; JPEG then
    decodes at 1/2, 1/4 or 1/8 scale when that still covers it, which makes a 12 MP
    photo several times cheaper to read."""
    from PIL import Image, UnidentifiedImageError
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(index, "not a JPEG, PNG, WebP or GIF image") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(index, f"too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(index, f"unreadable image header ({exc})") from None
    width, height = image.size
    if width <= 0 or height <= 0 or width * height > limits.max_pixels:
        raise ImageError(index, f"{width}x{height} is {width * height} pixels, over the limit "
                                f"of {limits.max_pixels} pixels")
    try:
        if draft_size and image.format == "JPEG":
            image.draft("RGB", _draft_request(image.size, draft_size))
        image.load()  # the first frame of a GIF or animated WebP
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        turn = _ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
        if turn is not None:
            # Not ImageOps.exif_transpose: it writes the EXIF block back out, and a
            # hostile block that parsed fails there (struct.error, TypeError: a 500)
            image = image.transpose(getattr(Image.Transpose, turn))
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageError(index, f"truncated or corrupt {image.format} data ({exc})") from None


_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the picture upright (1: as stored)
_ORIENTATION_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM",
                          5: "TRANSPOSE", 6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def _draft_request(size: tuple, target: tuple) -> tuple:
    """The smallest decoded size that still covers the content's size once fitted
    into target, whichever way EXIF turns the image."""
    (width, height), (target_w, target_h) = size, target
    scale = max(min(target_w / width, target_h / height),
                min(target_w / height, target_h / width))
    return (min(width, math.ceil(width * scale)), min(height, math.ceil(height * scale)))


def _to_rgb(image):
    from PIL import Image
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # 16-bit greyscale PNG: convert() would clip it white
        import numpy
        high_bytes = (numpy.asarray(image).astype(numpy.uint32) >> 8).clip(0, 255)
        return Image.fromarray(high_bytes.astype(numpy.uint8), "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


# ====================================================== 4. padding and resizing


def fit_to_encoder(image, width: int, height: int, resample=None):
    """The image padded (centred, PAD_COLOUR) to width:height and resized to it.

    Done as "resize the content, then paste it centred on a grey canvas", which is
    the same picture as "pad, then resize" without building a padded copy of a
    12 MP photo first."""
    from PIL import Image
    if resample is None:
        resample = Image.Resampling.BICUBIC  # what the VL families' own processors use
    scale = min(width / image.width, height / image.height)
    inner = (max(1, min(width, round(image.width * scale))),
             max(1, min(height, round(image.height * scale))))
    content = image if inner == image.size else image.resize(inner, resample, reducing_gap=3.0)
    if inner == (width, height):
        return content
    canvas = Image.new("RGB", (width, height), PAD_COLOUR)
    canvas.paste(content, ((width - inner[0]) // 2, (height - inner[1]) // 2))
    return canvas


# ====================================================== 5. layout and dtype


@dataclass(frozen=True)
class Normalisation:
    """Per-channel mean and std in 0-1 units (as preprocessor_config.json gives them)."""
    mean: tuple
    std: tuple

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("image_mean and image_std need three values (R, G, B)")
        if not all(0.0 <= m <= 1.0 for m in self.mean):
            raise ValueError(f"image_mean {list(self.mean)} is not in 0-1 units; divide "
                             "0-255 values by 255")
        if not all(0.0 < s <= 1.0 for s in self.std):
            raise ValueError(f"image_std {list(self.std)} must be in (0, 1]; divide "
                             "0-255 values by 255")


def to_encoder_array(image, spec, normalisation: Optional[Normalisation] = None):
    """The RGB image (already spec.width x spec.height) as the encoder's input:
    shape (1, H, W, C) or (1, C, H, W), dtype uint8 or float32."""
    import numpy
    if spec.layout not in LAYOUTS or spec.dtype not in DTYPES or spec.channels != 3:
        raise ValueError(f"unsupported encoder input: {spec.channels} channels, "
                         f"{spec.layout}, {spec.dtype}")
    if image.size != (spec.width, spec.height):
        raise ValueError(f"the image is {image.size}, the encoder takes "
                         f"{(spec.width, spec.height)}")
    pixels = numpy.asarray(image, dtype=numpy.uint8)  # H x W x 3
    if spec.dtype == "float32":
        pixels = _normalise(pixels, normalisation)
    if spec.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return numpy.ascontiguousarray(pixels[numpy.newaxis])


def _normalise(pixels, normalisation: Optional[Normalisation]):
    """(x / 255 - mean) / std folded into one multiply-add per channel."""
    import numpy
    norm = normalisation or Normalisation((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    scale = 1.0 / (255.0 * numpy.asarray(norm.std, dtype=numpy.float32))
    offset = -numpy.asarray(norm.mean, dtype=numpy.float32) / numpy.asarray(
        norm.std, dtype=numpy.float32)
    return pixels.astype(numpy.float32) * scale + offset


def preprocess(data: bytes, spec, normalisation: Optional[Normalisation] = None,
               index: int = 0, limits: ImageLimits = ImageLimits()):
    """One image's bytes to the encoder's input array (see to_encoder_array)."""
    image = open_image(data, index, limits, draft_size=(spec.width, spec.height))
    fitted = fit_to_encoder(image, spec.width, spec.height)
    return to_encoder_array(fitted, spec, normalisation)


def preprocess_all(sources: Sequence, spec, normalisation: Optional[Normalisation] = None,
                   limits: ImageLimits = ImageLimits()) -> list:
    """Every image of a request (data URLs or bytes), in order; refuses more than
    limits.max_images before decoding any."""
    if len(sources) > limits.max_images:
        raise ImageError(limits.max_images, f"{len(sources)} images in the request, over the "
                                            f"limit of {limits.max_images}")
    return [preprocess(image_bytes(source, index, limits), spec, normalisation, index, limits)
            for index, source in enumerate(sources)]


# ====================================================== the VL model families


# The text librkllmrt puts around an image's embedding rows in the prompt: start +
# content x n_image_tokens + end (the runtime protocol's type, so a runtime takes it).
ImageTokens = ImageTags


@dataclass(frozen=True)
class VisionFamily:
    name: str
    pattern: str              # searched in the lower-cased model name
    tokens: ImageTokens
    normalisation: Normalisation


_QWEN_TOKENS = ImageTokens("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
_CLIP = Normalisation((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_IMAGENET = Normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_HALF = Normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# Most specific first: "qwen2.5-vl" must not be taken for "qwen2-vl". The mean/std are
# the families' own processor defaults; an encoder converted with them folded in takes
# uint8 and needs none of this.
VISION_FAMILIES = (
    VisionFamily("qwen3-vl", r"qwen3[-_. ]?vl", _QWEN_TOKENS, _HALF),
    VisionFamily("qwen2.5-vl", r"qwen2[._]?5[-_. ]?vl", _QWEN_TOKENS, _CLIP),
    VisionFamily("qwen2-vl", r"qwen2[-_. ]?vl", _QWEN_TOKENS, _CLIP),
    VisionFamily("internvl", r"internvl", ImageTokens("<img>", "</img>", "<IMG_CONTEXT>"),
                 _IMAGENET),
    VisionFamily("minicpm-v", r"minicpm(?:[-_. ]?llama3)?[-_. ]?[vo](?![a-z])",
                 ImageTokens("<image>", "</image>", "<unk>"), _HALF),
    VisionFamily("gemma3", r"gemma[-_. ]?3",
                 ImageTokens("<start_of_image>", "<end_of_image>", "<image_soft_token>"), _HALF),
)


def vision_family(model_name: str) -> Optional[VisionFamily]:
    name = model_name.lower()
    for family in VISION_FAMILIES:
        if re.search(family.pattern, name):
            return family
    return None


def image_tokens(model_name: str, config: Optional[dict] = None) -> Optional[ImageTokens]:
    """The model's image tokens: its family's, with model_config.json's
    `"image_tokens": {"start": ..., "end": ..., "content": ...}` on top (all three
    when the family is unknown); None when neither says."""
    family = vision_family(model_name)
    override = (config or {}).get("image_tokens") or {}
    if not isinstance(override, dict) or not set(override) <= {"start", "end", "content"}:
        raise ValueError("model_config.json image_tokens must be an object with start, end "
                         f"and content; got {override!r}")
    if family is None:
        if not override:
            return None
        if set(override) != {"start", "end", "content"}:
            raise ValueError(f"{model_name} is not a known VL family: image_tokens needs all "
                             "of start, end and content")
        return ImageTokens(**{k: str(v) for k, v in override.items()})
    return replace(family.tokens, **{k: str(v) for k, v in override.items()})


def normalisation_for(model_name: str, config: Optional[dict] = None) -> Optional[Normalisation]:
    """model_config.json's `"image_mean"`/`"image_std"` (0-1 units, like
    preprocessor_config.json), else the family's, else None (pixels scaled to 0-1)."""
    config = config or {}
    family = vision_family(model_name)
    if "image_mean" in config or "image_std" in config:
        base = family.normalisation if family else _HALF
        mean = tuple(float(v) for v in config.get("image_mean", base.mean))
        std = tuple(float(v) for v in config.get("image_std", base.std))
        return Normalisation(mean, std)
    return family.normalisation if family else None


def runtime_options(model) -> dict:
    """What open_runtime needs beyond the model file for a registry model: the image
    tags of a model with a vision encoder, nothing for the others (nor for a model
    whose tags are unknown or whose model_config.json image_tokens do not parse)."""
    if "vision" not in model.capabilities:
        return {}
    try:
        tags = image_tokens(model.id, model.config)
    except ValueError:   # requests with images get the 400 that says why; text still runs
        return {}
    return {"image_tags": tags} if tags is not None else {}
