"""The pieces of the vision path below the HTTP server: which URLs may be fetched,
where image markers go, and how RKLLMRuntime hands images to librkllmrt (the
compiled double, both ABIs)."""
from __future__ import annotations

import numpy
import pytest

from rkllm_api.image_fetch import FetchPolicy, ImageFetchError, check_url
from rkllm_api.request import ImagePart, Message, TextPart
from rkllm_api.runtimes.base import IMAGE_MARKER, ImageEmbedding, ImageTags, RunRequest
from rkllm_api.vision_service import with_markers

TAGS = ImageTags("<img>", "</img>", "<IMG_CONTEXT>")
WIDTH = 64   # the double's hidden width: it reads each image row as this many floats


# ------------------------------------------------------------ URLs


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/cat.png", "http://localhost:8080/cat.png", "http://[::1]/cat.png",
    "http://169.254.169.254/latest/meta-data", "http://10.1.2.3/x.png",
    "https://192.168.1.20/x.png", "http://0.0.0.0/x.png", "http://[fe80::1]/x.png",
    # other spellings of loopback: decimal, octal, IPv4-mapped IPv6, user info in front
    "http://2130706433/x.png", "http://0177.0.0.1/x.png", "http://[::ffff:127.0.0.1]/x.png",
    "http://example.org@127.0.0.1/x.png",
    # IPv6 carrying a private IPv4 (NAT64, 6to4, IPv4-compatible), which Python calls global
    "http://[64:ff9b::a00:1]/x.png", "http://[2002:c0a8:101::1]/x.png", "http://[::a00:1]/x.png",
])
def test_non_public_addresses_are_refused_unless_allowed(url):
    with pytest.raises(ImageFetchError, match="non-public address"):
        check_url(url, FetchPolicy())
    check_url(url, FetchPolicy(allow_private=True))   # allowed: no error


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/x.png",
                                 "gopher://127.0.0.1/", "http:///nohost.png", "javascript:1"])
def test_only_http_and_https_urls_are_fetched(url):
    with pytest.raises(ImageFetchError, match="not an http"):
        check_url(url, FetchPolicy(allow_private=True))


def test_a_public_address_behind_nat64_is_allowed():
    assert check_url("http://[64:ff9b::808:808]/x.png", FetchPolicy()) == "64:ff9b::808:808"


def test_an_unparseable_url_is_refused_as_such():
    with pytest.raises(ImageFetchError, match="not a valid URL"):
        check_url("http://[::1/x.png", FetchPolicy(allow_private=True))


def test_the_refusal_does_not_echo_a_query_string():
    with pytest.raises(ImageFetchError) as caught:
        check_url("http://127.0.0.1/x.png?token=secret", FetchPolicy())
    assert "secret" not in str(caught.value)


# ------------------------------------------------------------ markers


def test_markers_go_before_each_user_message_text_one_per_image():
    a, b = ImagePart("data:image/png;base64,AA"), ImagePart("data:image/png;base64,BB")
    messages = (Message("system", (TextPart(f"Never write {IMAGE_MARKER} yourself."),)),
                Message("user", (TextPart("Compare"), a, b)),
                Message("assistant", (TextPart(f"I see {IMAGE_MARKER} two."),)),
                Message("user", (TextPart(f"and {IMAGE_MARKER} this"), a)))
    marked = with_markers(messages)
    assert marked[0].text == "Never write  yourself."
    assert marked[1].text == f"{IMAGE_MARKER}{IMAGE_MARKER}\nCompare"
    assert marked[1].images == (a, b)
    assert marked[2].text == "I see  two."
    assert marked[3].text == f"{IMAGE_MARKER}\nand  this"


# ------------------------------------------------------------ the runtime


def image(value: float, digest: str) -> ImageEmbedding:
    rows = numpy.full((4, WIDTH), value, dtype=numpy.float32)
    return ImageEmbedding(rows, digest, 32, 32)


@pytest.fixture
def vl_runtime(rkllm_record, npu_settings, fake_rkllm_model):
    from rkllm_ctypes import RKLLMRuntime
    runtime = RKLLMRuntime(fake_rkllm_model, context_length=4096, settings=npu_settings,
                           image_tags=TAGS)
    yield runtime
    runtime.close()


def test_a_prompt_carries_its_last_images_as_multimodal_input(vl_runtime, rkllm_record,
                                                             rkllm_double_abi):
    assert vl_runtime.capabilities.images
    request = RunRequest(prompt=f"User: {IMAGE_MARKER}\nand this one? @@reply:ok@@",
                         images=(image(1.0, "first"), image(2.0, "second")))
    result = vl_runtime.run(request, lambda event: None)
    assert result.text == "ok"
    mm = rkllm_record.last("run")["multimodal"]
    # one marker: the newest image only (the older one is in the KV cache already)
    assert (mm["n_image"], mm["n_image_tokens"]) == (1, 4)
    assert mm["rows"][0][0] == [2.0, 2.0, 2.0] and mm["embed_sum"] == 2.0 * 4 * WIDTH
    assert (mm["image_width"], mm["image_height"]) == (32, 32)
    if rkllm_double_abi == "1.3":
        assert (mm["image_start"], mm["image_end"], mm["image_content"]) == (
            "<img>", "</img>", "<IMG_CONTEXT>")
    else:
        init = rkllm_record.last("init")
        assert (init["img_start"], init["img_end"], init["img_content"]) == (
            "<img>", "</img>", "<IMG_CONTEXT>")


def test_a_prompt_without_markers_is_plain_text(vl_runtime, rkllm_record):
    request = RunRequest(prompt="What else? @@reply:more@@", images=(image(1.0, "a"),))
    assert vl_runtime.run(request, lambda event: None).text == "more"
    run = rkllm_record.last("run")
    assert run["input_type"] == 0 and "multimodal" not in run


def test_more_markers_than_images_is_refused_before_the_library_is_called(vl_runtime,
                                                                         rkllm_record):
    request = RunRequest(prompt=f"{IMAGE_MARKER}{IMAGE_MARKER} two?", images=(image(1.0, "a"),))
    with pytest.raises(RuntimeError, match="2 images"):
        vl_runtime.run(request, lambda event: None)
    assert rkllm_record.entries("run") == []


def test_a_text_model_has_no_image_tags(rkllm_record, npu_runtime, rkllm_double_abi):
    assert not npu_runtime.capabilities.images
    if rkllm_double_abi == "1.2":
        assert rkllm_record.last("init")["img_start"] is None


# ------------------------------------------------------------ the vision service


def red_png() -> bytes:
    import io
    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def vision_model(tmp_path, rknn_double_lib):
    """A registry model with a .rkllm and a fake .rknn, and settings for the double."""
    from rkllm_api.config import Settings
    from rkllm_api.models.registry import Registry
    from support.doubles import make_fake_rkllm_model
    from support.rknn_double import make_fake_rknn_model
    folder = tmp_path / "models" / "qwen2-vl-tiny"
    make_fake_rkllm_model(folder, "qwen2-vl-tiny")
    make_fake_rknn_model(folder, h=32, w=32, out="16x64")
    settings = Settings(models_root=str(tmp_path / "models"), include_bundled_model=False,
                        rknn_lib_path=rknn_double_lib, idle_unload_seconds=0)
    return settings, Registry(settings).resolve("qwen2-vl-tiny")


def test_prepare_marks_keys_and_encodes_every_user_image(vision_model, rknn_record):
    import base64
    from rkllm_api.vision_service import VisionService
    from support.messages import typed
    settings, info = vision_model
    assert "vision" in info.capabilities
    url = "data:image/png;base64," + base64.b64encode(red_png()).decode()
    messages = typed([{"role": "user", "content": [
        {"type": "text", "text": "Two?"}, {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": url}}]}])
    service = VisionService(settings)
    try:
        prepared = service.prepare(info, messages)
        assert prepared.messages[0].text == f"{IMAGE_MARKER}{IMAGE_MARKER}\nTwo?"
        first, second = prepared.images
        assert first.rows.shape == (16, 64) and (first.width, first.height) == (32, 32)
        assert first.digest == second.digest == prepared.messages[0].images[0].digest
        # the same bytes twice: encoded once
        assert rknn_record.calls().count("run") == 1
    finally:
        service.close()


def test_an_idle_encoder_is_closed_and_loaded_again(vision_model, rknn_record):
    import base64
    from rkllm_api.vision_service import VisionService
    from support.messages import typed
    settings, info = vision_model
    url = "data:image/png;base64," + base64.b64encode(red_png()).decode()
    messages = typed([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}])
    service = VisionService(settings)
    try:
        first = service.prepare(info, messages)
        assert service.loaded() == ["qwen2-vl-tiny"]
        assert service.close_idle(3600) == []                  # used just now
        assert service.close_idle(0) == ["qwen2-vl-tiny"] and service.loaded() == []
        assert rknn_record.calls().count("destroy") == 1
        again = service.prepare(info, messages)
        assert rknn_record.calls().count("init") == 2
        numpy.testing.assert_array_equal(first.images[0].rows, again.images[0].rows)
    finally:
        service.close()
    assert rknn_record.calls().count("destroy") == 2
