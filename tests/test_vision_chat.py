"""Images in chat, end to end: a real gunicorn server, the librkllmrt double (both
ABIs) for the language models and the librknnrt double for the vision encoder.

Each server's models root holds a text model (fake-npu-model) and a vision model
(qwen2-vl-2b: a .rkllm and a .rknn whose fake encoder takes 32 x 32 uint8 NHWC
images and answers 16 rows of 64: row r*4+c holds the mean colour of patch (r, c)).
The 1.3 server routes images (VL_ROUTING on) and may fetch private addresses; the
1.2 server does neither, so both settings are seen both ways.
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import threading
import time

import ollama
import openai
import pytest
from PIL import Image

from support.doubles import RkllmRecord
from support.live_server import free_port, start_npu_server
from support.processes import children_of, gunicorn_worker, running
from support.rag_requests import eiffel_request
from support.rknn_double import RknnRecord, make_fake_rknn_model

VL_MODEL = "qwen2-vl-2b"
BROKEN_VL_MODEL = "qwen2.5-vl-broken"          # its encoder fails every run
UNLOADABLE_VL_MODEL = "qwen2.5-vl-unloadable"  # its encoder fails to load
WIDE_VL_MODEL = "qwen3-vl-wide"    # 4096 rows per image: one image fills the context
CRASHING_VL_MODEL = "qwen2.5-vl-crashing"      # its encoder dies with SIGSEGV in a run
TEXT_MODEL = "fake-npu-model"
RED, BLUE, GREEN, GREY = (255, 0, 0), (0, 0, 255), (0, 255, 0), (128, 128, 128)
QWEN_TAGS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def left_right(left, right, size=(64, 32)) -> bytes:
    """A wide image: left half one colour, right half another."""
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return png(image)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def owui_message(text: str, *urls: str) -> dict:
    """What Open WebUI sends for a pasted image: text part, then image_url parts."""
    return {"role": "user", "content": [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": url}} for url in urls]}


def grid(rows: list) -> list:
    """The recorded rows (first three values each) as a 4 x 4 grid of colours."""
    return [rows[r * 4:(r + 1) * 4] for r in range(4)]


def near(value, colour, tolerance=3) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(value, colour))


def add_encoders(models_root: str) -> None:
    """The .rknn beside each vision model's .rkllm."""
    make_fake_rknn_model(os.path.join(models_root, VL_MODEL), h=32, w=32, out="16x64")
    make_fake_rknn_model(os.path.join(models_root, BROKEN_VL_MODEL), h=32, w=32, out="16x64",
                         fail="run:-3")
    make_fake_rknn_model(os.path.join(models_root, WIDE_VL_MODEL), h=64, w=64, out="4096x64")
    make_fake_rknn_model(os.path.join(models_root, UNLOADABLE_VL_MODEL), h=32, w=32,
                         out="16x64", fail="init")
    make_fake_rknn_model(os.path.join(models_root, CRASHING_VL_MODEL), h=32, w=32,
                         out="16x64", crash="run")


def start_vision_server(live_servers, libs, rknn_lib, abi, **env):
    rknn_record = os.path.join(live_servers.tmp_dir, f"rknn-{abi}.jsonl")
    server = start_npu_server(live_servers, libs, abi=abi,
                              extra_models=(VL_MODEL, BROKEN_VL_MODEL, WIDE_VL_MODEL,
                                            UNLOADABLE_VL_MODEL, CRASHING_VL_MODEL),
                              prepare_models=add_encoders, RKNN_LIB_PATH=rknn_lib, FAKE_RKNN_RECORD=rknn_record,
                              IMAGE_MAX_COUNT="3", IMAGE_MAX_BYTES=str(2 * 1024 * 1024),
                              IMAGE_URL_TIMEOUT="2", **env)
    server.rknn = RknnRecord(rknn_record)
    return server


@pytest.fixture(scope="module")
def servers(live_servers, rkllm_double_libs, rknn_double_lib):
    return {
        "1.3": start_vision_server(live_servers, rkllm_double_libs, rknn_double_lib, "1.3",
                                   VL_ROUTING="true", IMAGE_URL_PRIVATE="true",
                                   NPU_RESIDENT_MODELS="2"),
        "1.2": start_vision_server(live_servers, rkllm_double_libs, rknn_double_lib, "1.2",
                                   VL_ROUTING="false"),
    }


def last_run(record: RkllmRecord) -> dict:
    return record.last("run")


def chat(server, messages, model=VL_MODEL, **extra):
    return server.post("/v1/chat/completions",
                       json={"model": model, "messages": messages, **extra})


# ------------------------------------------------------------ the whole path


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_an_open_webui_image_reaches_the_encoder_and_librkllmrt(servers, abi):
    server = servers[abi]
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    image = data_url(left_right(RED, BLUE))
    stream = client.chat.completions.create(
        model=VL_MODEL, stream=True,
        messages=[owui_message("What is in the picture? @@reply:A red and blue flag.@@", image)])
    answer = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert answer == "A red and blue flag."

    run = last_run(server.record)
    assert run["input_type"] == 3 and run["prompt"] is None   # MULTIMODAL, not PROMPT
    mm = run["multimodal"]
    assert mm["prompt"].count("<image>") == 1 and "What is in the picture?" in mm["prompt"]
    assert (mm["n_image"], mm["n_image_tokens"]) == (1, 16)
    assert (mm["image_width"], mm["image_height"]) == (32, 32)
    # The 64 x 32 image, padded to a square with grey bands above and below and
    # resized to 32 x 32: the patch means the encoder computed, as librkllmrt got them.
    rows = grid(mm["rows"][0])
    assert all(near(cell, GREY) for cell in rows[0] + rows[3])
    assert all(near(rows[r][0], RED) and near(rows[r][3], BLUE) for r in (1, 2))
    assert all(near(rows[r][1], RED, 40) and near(rows[r][2], BLUE, 40) for r in (1, 2))
    if abi == "1.3":   # the tags travel with the input
        assert (mm["image_start"], mm["image_end"], mm["image_content"]) == QWEN_TAGS
    else:              # 1.2: given once, at init, in RKLLMParam
        init = [e for e in server.record.entries("init") if VL_MODEL in e["model_path"]][-1]
        assert (init["img_start"], init["img_end"], init["img_content"]) == QWEN_TAGS
    encoded = server.rknn.last("inputs_set")
    assert encoded["size"] == 32 * 32 * 3


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_several_images_in_one_message_keep_their_order(servers, abi):
    server = servers[abi]
    first, second = data_url(left_right(RED, RED)), data_url(left_right(GREEN, GREEN))
    response = chat(server, [owui_message("Compare them.", first, second)])
    assert response.status_code == 200, response.text
    mm = last_run(server.record)["multimodal"]
    assert mm["n_image"] == 2 and mm["prompt"].count("<image>") == 2
    assert near(grid(mm["rows"][0])[1][1], RED) and near(grid(mm["rows"][1])[1][1], GREEN)


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_images_across_a_conversation_all_reach_a_fresh_run(servers, abi):
    server = servers[abi]
    red, blue = data_url(left_right(RED, RED)), data_url(left_right(BLUE, BLUE))
    messages = [owui_message("First picture.", red),
                {"role": "assistant", "content": "A red square."},
                owui_message("And this one? @@reply:Blue.@@", blue)]
    response = chat(server, messages)
    assert response.status_code == 200, response.text
    mm = last_run(server.record)["multimodal"]
    assert mm["n_image"] == 2
    assert near(grid(mm["rows"][0])[1][1], RED) and near(grid(mm["rows"][1])[1][1], BLUE)


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_a_follow_up_keeps_the_image_in_context(servers, abi):
    server = servers[abi]
    image = data_url(left_right(GREEN, BLUE))
    first = [owui_message("Describe this. @@reply:Green and blue.@@", image)]
    assert chat(server, first).status_code == 200
    encoder_runs = len(server.rknn.entries("run"))
    follow_up = first + [{"role": "assistant", "content": "Green and blue."},
                         {"role": "user", "content": "Which colour is on the left?"}]
    response = chat(server, follow_up)
    assert response.status_code == 200, response.text
    run = last_run(server.record)
    # The image's rows are still in the KV cache: only the new question is sent ...
    assert response.headers["X-RKLLM-KV"] == "reuse"
    assert run["input_type"] == 0 and "Which colour" in run["prompt"]
    # ... and the encoder was not run again for an image it has seen.
    assert len(server.rknn.entries("run")) == encoder_runs


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_the_image_is_part_of_the_kv_key(servers, abi):
    """The same words about another image must not reuse the first image's KV state."""
    server = servers[abi]
    first = [owui_message("Describe this. @@reply:Red.@@", data_url(left_right(RED, GREEN)))]
    assert chat(server, first).status_code == 200
    swapped = [owui_message("Describe this. @@reply:Red.@@", data_url(left_right(BLUE, GREEN))),
               {"role": "assistant", "content": "Red."},
               {"role": "user", "content": "Are you sure?"}]
    response = chat(server, swapped)
    assert response.status_code == 200, response.text
    assert response.headers["X-RKLLM-KV"] != "reuse"
    mm = last_run(server.record)["multimodal"]
    assert mm["n_image"] == 1 and near(grid(mm["rows"][0])[1][0], BLUE)


# ------------------------------------------------------------------ routing


def test_images_for_a_text_model_go_to_the_vision_model(servers):
    server = servers["1.3"]
    response = chat(server, [owui_message("What is it?", data_url(left_right(RED, BLUE)))],
                    model=TEXT_MODEL)
    assert response.status_code == 200, response.text
    assert response.headers["X-RKLLM-Routed-To"] == VL_MODEL
    assert response.json()["model"] == VL_MODEL
    assert last_run(server.record)["multimodal"]["n_image"] == 1
    text_only = chat(server, [{"role": "user", "content": "hi"}], model=TEXT_MODEL)
    assert "X-RKLLM-Routed-To" not in text_only.headers


def test_the_text_and_the_vision_model_stay_loaded_together(servers):
    """NPU_RESIDENT_MODELS=2: switching between them loads neither again."""
    server = servers["1.3"]
    image = data_url(left_right(RED, BLUE))
    for _ in range(2):
        assert chat(server, [{"role": "user", "content": "hi"}], model=TEXT_MODEL).ok
        assert chat(server, [owui_message("What is it?", image)], model=TEXT_MODEL).ok
    loaded = {m["model"].split(":")[0] for m in server.get("/api/ps").json()["models"]}
    assert {TEXT_MODEL, VL_MODEL} <= loaded
    inits = {}
    for entry in server.record.entries("init"):
        inits.setdefault(os.path.basename(entry["model_path"]), []).append(entry)
    text_inits, vl_inits = inits[f"{TEXT_MODEL}.rkllm"], inits[f"{VL_MODEL}.rkllm"]
    assert len(text_inits) == 1 and len(vl_inits) == 1
    assert text_inits[0]["base_domain_id"] != vl_inits[0]["base_domain_id"]


def test_without_routing_images_for_a_text_model_are_a_400_naming_it(servers):
    server = servers["1.2"]
    response = chat(server, [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"},
                             owui_message("What is it?", data_url(left_right(RED, BLUE)))],
                    model=TEXT_MODEL)
    assert response.status_code == 400
    error = response.json()["error"]
    assert TEXT_MODEL in error["message"] and "VL_ROUTING" in error["message"]
    assert error["param"] == "messages[2].content"


@pytest.mark.parametrize("role", ["system", "assistant"])
@pytest.mark.parametrize("model", [VL_MODEL, TEXT_MODEL])
def test_an_image_outside_a_user_message_is_a_400_not_dropped(servers, role, model):
    """Only user messages' images reach the model: one in a system or assistant
    message was dropped without a word (and still routed a text model's request to
    the vision model); as at OpenAI, it is a 400 naming the message."""
    server = servers["1.3"]
    image = {"type": "image_url", "image_url": {"url": data_url(left_right(RED, BLUE))}}
    messages = [{"role": "user", "content": "hi"},
                {"role": role, "content": [{"type": "text", "text": "Look."}, image]},
                {"role": "user", "content": "What did you see?"}]
    response = chat(server, messages, model=model)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[1].content" and error["code"] == "invalid_image"
    assert f"not in {role} messages" in error["message"]
    ollama_reply = server.post("/api/chat", json={"model": model, "stream": False, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Look.", "images": [base64.b64encode(
            left_right(RED, BLUE)).decode()]}]})
    assert ollama_reply.status_code == 400
    assert "not in assistant messages" in ollama_reply.json()["error"]


# ---------------------------------------------------------- bad images, limits


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header declaring width x height (a decompression bomb's disguise)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                            8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"\0" * 8))


@pytest.mark.parametrize("url, reason", [
    ("data:image/png;base64," + base64.b64encode(b"not a picture").decode(),
     "not a JPEG, PNG, WebP or GIF"),
    (data_url(png_claiming(10000, 10000)), "over the limit of 50000000 pixels"),
    (data_url(png_claiming(60000, 60000)), "too many pixels"),
    (data_url(left_right(RED, BLUE)[:60]), "truncated or corrupt"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("data:image/png;base64,@@@@", "base64"),
    ("ftp://example.org/cat.png", "not an http(s) URL"),
], ids=["not-an-image", "bomb", "huge-bomb", "truncated", "text", "bad-base64", "ftp"])
@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_a_bad_image_is_a_400_naming_the_message_and_why(servers, abi, url, reason):
    server = servers[abi]
    runs = len(server.record.entries("run"))
    response = chat(server, [{"role": "system", "content": "Be brief."},
                             owui_message("Look.", data_url(left_right(RED, RED)), url)])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and error["param"] == "messages[1].content"
    assert "image 1" in error["message"] and reason in error["message"]
    assert len(server.record.entries("run")) == runs   # nothing ran


@pytest.mark.parametrize("abi", ["1.2", "1.3"])
def test_too_many_images_are_refused_before_any_is_read(servers, abi):
    server = servers[abi]
    image = data_url(left_right(RED, RED))
    response = chat(server, [owui_message("Four.", image, image, image, image)])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_many_images"
    assert "IMAGE_MAX_COUNT" in response.json()["error"]["message"]


def test_an_image_over_the_byte_limit_is_refused(servers):
    server = servers["1.3"]
    noisy = Image.frombytes("RGB", (1024, 1024), os.urandom(1024 * 1024 * 3))
    response = chat(server, [owui_message("Big.", data_url(png(noisy)))])
    assert response.status_code == 400
    assert "over the limit" in response.json()["error"]["message"]


def test_an_images_rows_count_against_the_context(servers):
    server = servers["1.3"]
    response = chat(server, [owui_message("Look.", data_url(left_right(RED, RED)))],
                    model=WIDE_VL_MODEL)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "4096 tokens" in error["message"]


@pytest.mark.parametrize("model", [BROKEN_VL_MODEL, UNLOADABLE_VL_MODEL])
def test_an_encoder_failure_is_a_500_that_names_no_library(servers, model):
    server = servers["1.3"]
    response = chat(server, [owui_message("Look.", data_url(left_right(RED, RED)))],
                    model=model)
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "rknn" not in message.lower() and "/" not in message


def test_an_encoder_that_crashes_ends_its_own_process_not_the_server(servers):
    """librknnrt runs in a child process of its own (RUNTIME_ISOLATION): a SIGSEGV in
    the encoder is a clean 500, the worker lives on, other models still see images,
    and the next image loads the encoder again (here: mended in the meantime)."""
    server = servers["1.3"]
    worker = gunicorn_worker(server.proc.pid)
    image = [owui_message("Look.", data_url(left_right(RED, BLUE)))]
    response = chat(server, image, model=CRASHING_VL_MODEL)
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "rknn" not in message.lower() and "/" not in message
    assert server.rknn.last("run").get("crash") is True
    assert gunicorn_worker(server.proc.pid) == worker       # the server's worker lives
    assert chat(server, image).status_code == 200            # another model's encoder works
    folder = os.path.join(os.path.dirname(server.record.path), "models", CRASHING_VL_MODEL)
    make_fake_rknn_model(folder, h=32, w=32, out="16x64")    # the same file, mended
    mended = chat(server, image, model=CRASHING_VL_MODEL)
    assert mended.status_code == 200, mended.text
    assert not [pid for pid in children_of(worker) if not running(pid)], "a zombie was left"


# ------------------------------------------------------------------ image URLs


def test_an_http_image_is_fetched_when_private_addresses_are_allowed(servers, image_server):
    server = servers["1.3"]    # IMAGE_URL_PRIVATE=true: 127.0.0.1 is private
    image_server.files["/flag.png"] = left_right(RED, BLUE)
    response = chat(server, [owui_message("What is it?",
                                          image_server.url + "/redirect/flag.png")])
    assert response.status_code == 200, response.text
    assert "/flag.png" in image_server.hits
    rows = grid(last_run(server.record)["multimodal"]["rows"][0])
    assert near(rows[1][0], RED) and near(rows[1][3], BLUE) and near(rows[0][0], GREY)


@pytest.mark.parametrize("path, reason", [
    ("/missing.png", "answered 404"),
    ("/slow/slow.png", "longer than 2 s"),
    ("/endless", "over the limit"),
], ids=["404", "slow", "endless"])
def test_a_url_that_fails_is_a_400_saying_why(servers, image_server, path, reason):
    server = servers["1.3"]
    image_server.files["/slow.png"] = left_right(RED, BLUE)
    response = chat(server, [owui_message("What is it?", image_server.url + path)])
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"]["message"]


def test_a_server_trickling_its_headers_is_cut_off_at_the_time_limit(servers, image_server):
    """IMAGE_URL_TIMEOUT bounds the whole fetch, not each read: a server sending its
    status line and headers a byte at a time (each byte well within a read timeout)
    is cut off after 2 s, not served for as long as it keeps trickling."""
    server = servers["1.3"]
    response = chat(server, [owui_message("What is it?", image_server.url + "/slow-headers")])
    assert response.status_code == 400, response.text
    assert "took longer than 2 s (IMAGE_URL_TIMEOUT)" in response.json()["error"]["message"]


def test_slow_image_urls_never_hold_up_an_image_that_is_already_here(servers, image_server):
    """URLs are fetched before a request takes one of the PREPARING_AT_ONCE slots: two
    requests with slow URLs held both slots until IMAGE_URL_TIMEOUT (2 s here) cut
    them off, and an Open WebUI image sent meanwhile waited for them."""
    server = servers["1.3"]
    image_server.files["/held.png"] = left_right(RED, BLUE)
    slow = image_server.url + "/slow/held.png"
    answers = {}

    def ask(name):
        answers[name] = chat(server, [owui_message("What is it?", slow, slow, slow)])
    holders = [threading.Thread(target=ask, args=(f"slow{i}",)) for i in range(2)]
    for thread in holders:
        thread.start()
    for _ in range(200):   # bounded: until both are fetching
        if image_server.hits.count("/slow/held.png") >= 2:
            break
        time.sleep(0.02)
    here = chat(server, [owui_message("What is it?", data_url(left_right(GREEN, BLUE)))])
    still_fetching = [thread.is_alive() for thread in holders]
    for thread in holders:
        thread.join(60)
    assert here.status_code == 200, here.text
    assert all(still_fetching), "the image that was here waited for the slow URLs"
    for name in ("slow0", "slow1"):
        assert answers[name].status_code == 400
        assert "longer than 2 s" in answers[name].json()["error"]["message"]


@pytest.mark.parametrize("url, reason", [
    ("http://[::1/cat.png", "is not a valid URL"),
    ("{image_server}/bad-redirect", "redirects to an invalid URL"),
    ("http://127.0.0.1:{closed_port}/cat.png", "cannot connect to http://127.0.0.1:"),
], ids=["unclosed-ipv6", "bad-redirect", "refused"])
def test_an_unusable_url_is_a_400_saying_why(servers, image_server, url, reason):
    """An unparseable URL (or redirect target) was a 500; a refused connection was
    reported as a timeout."""
    url = url.format(image_server=image_server.url, closed_port=free_port())
    response = chat(servers["1.3"], [owui_message("What is it?", url)])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and reason in error["message"]


def test_an_https_url_with_a_self_signed_certificate_is_a_400(servers, image_server, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    image_server.files["/tls.png"] = left_right(RED, BLUE)
    response = chat(servers["1.3"], [owui_message(
        "What is it?", image_server.start_https(cert, key) + "/tls.png")])
    assert response.status_code == 400, response.text
    assert "TLS certificate is not trusted" in response.json()["error"]["message"]


def test_private_addresses_are_refused_by_default(servers, image_server):
    server = servers["1.2"]    # IMAGE_URL_PRIVATE unset
    image_server.files["/private.png"] = left_right(RED, BLUE)
    response = chat(server, [owui_message("What is it?", image_server.url + "/private.png")])
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "non-public address 127.0.0.1" in message and "IMAGE_URL_PRIVATE" in message
    assert "/private.png" not in image_server.hits


# --------------------------------------------------------------------- Ollama


def test_ollama_images_reach_the_vision_model(servers):
    server = servers["1.3"]
    client = ollama.Client(host=server.url)
    assert "vision" in client.show(VL_MODEL).capabilities        # Open WebUI offers uploads
    assert "vision" not in client.show(TEXT_MODEL).capabilities
    reply = client.chat(model=VL_MODEL, messages=[{
        "role": "user", "content": "What is it? @@reply:A flag.@@",
        "images": [left_right(BLUE, RED)]}])
    assert reply.message.content == "A flag."
    rows = grid(last_run(server.record)["multimodal"]["rows"][0])
    assert near(rows[1][0], BLUE) and near(rows[2][3], RED)


def test_ollama_generate_with_images_and_a_bad_one(servers):
    server = servers["1.3"]
    client = ollama.Client(host=server.url)
    reply = client.generate(model=VL_MODEL, prompt="Describe. @@reply:Two halves.@@",
                            images=[left_right(GREEN, RED)])
    assert reply.response == "Two halves."
    assert near(grid(last_run(server.record)["multimodal"]["rows"][0])[1][0], GREEN)
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model=VL_MODEL, prompt="Describe.", images=[b"GIF89a broken"])
    assert refused.value.status_code == 400 and "image 0" in refused.value.error
    # base64 of no image format: the decoder's reason, not a data URL's media type
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model=VL_MODEL, prompt="Describe.", images=[b"plain text here"])
    assert refused.value.status_code == 400
    assert "not a JPEG, PNG, WebP or GIF image" in refused.value.error


# ------------------------------------------------------------------------ RAG


def test_retrieved_text_and_the_image_reach_the_vision_prompt_together(servers):
    """Open WebUI with web search on and an image pasted: the cleaned sources and the
    image go into one standalone run."""
    server = servers["1.3"]
    messages = eiffel_request(placement="user")
    last = messages[-1]
    messages[-1] = owui_message(last["content"], data_url(left_right(RED, BLUE)))
    response = chat(server, messages)
    assert response.status_code == 200, response.text
    run = last_run(server.record)
    mm = run["multimodal"]
    assert mm["n_image"] == 1 and mm["prompt"].count("<image>") == 1
    assert "330 metres" in mm["prompt"]                        # the sources' text
    assert "<source" not in mm["prompt"]                       # cleaned, not pasted raw
    assert run["keep_history"] == 0                            # standalone RAG turn
