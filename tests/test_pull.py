"""Pulling models from a hub (rkllm_api/models/hub.py, rkllm_api/pull.py): the real
huggingface_hub against the fake hub in tests/support/fake_hub.py."""
from __future__ import annotations

import hashlib
import os

import pytest

from rkllm_api.config import Settings
from rkllm_api.models import hub
from rkllm_api.pull import PullService
from support.fake_hub import REPOS

QWEN = "acme/Qwen3-0.6B-RKLLM"
TINY = "acme/tiny-chat"
TINY_FILE = "models/tiny-chat.rkllm"


def pull(fake_hub, root, board, spec):
    events = []
    model_id = hub.Puller(str(root), board, endpoint=fake_hub.url).pull(spec, events.append)
    return model_id, events


def folder_listing(root) -> dict:
    return {name: sorted(os.listdir(os.path.join(root, name))) for name in os.listdir(root)}


@pytest.mark.parametrize("board, model_file, encoder", [
    (hub.Board("rk3588", ("1.2.1",)), "qwen3-0.6b-w8a8-rk3588-v1.2.1.rkllm", "vision-rk3588.rknn"),
    (hub.Board("rk3588", ("1.1.4",)), "qwen3-0.6b-w8a8-rk3588-v1.1.4.rkllm", "vision-rk3588.rknn"),
    (hub.Board("rk3576", ("1.2.1",)), "qwen3-0.6b-w8a8-rk3576.rkllm", "vision-rk3576.rknn"),
])
def test_the_file_for_the_board_and_its_companions_are_pulled(fake_hub, tmp_path, board,
                                                              model_file, encoder):
    model_id, events = pull(fake_hub, tmp_path, board, QWEN)
    assert model_id == model_file[:-len(".rkllm")]
    assert folder_listing(tmp_path) == {
        model_id: sorted([model_file, encoder, "tokenizer.json", "config.json"])}
    with open(tmp_path / model_id / model_file, "rb") as fh:
        assert fh.read() == REPOS[QWEN][model_file]


def test_progress_events_come_in_order(fake_hub, tmp_path):
    _, events = pull(fake_hub, tmp_path, hub.Board("rk3576"), QWEN)
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    files = [e for e in events if "digest" in e]
    order = list(dict.fromkeys(e["status"] for e in files))
    assert order[0] == "pulling qwen3-0.6b-w8a8-rk3576.rkllm"
    for status in order:   # each file: one run of events, counting up to its total
        run = [e for e in files if e["status"] == status]
        assert [e["completed"] for e in run] == sorted(e["completed"] for e in run)
        assert run[0]["completed"] == 0 and run[-1]["completed"] == run[-1]["total"]
    model_event = next(e for e in files if e["status"].endswith(".rkllm"))
    data = REPOS[QWEN]["qwen3-0.6b-w8a8-rk3576.rkllm"]
    assert model_event["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert model_event["total"] == len(data)


def test_a_repo_without_board_names_gives_its_one_model_from_a_sub_folder(fake_hub, tmp_path):
    model_id, _ = pull(fake_hub, tmp_path, hub.Board(""), TINY)
    assert folder_listing(tmp_path) == {"tiny-chat": ["tiny-chat.rkllm", "tokenizer_config.json"]}


@pytest.mark.parametrize("board, spec, code, names", [
    (hub.Board("rk3588"), QWEN, "ambiguous_model", ["v1.2.1.rkllm", "v1.1.4.rkllm"]),
    (hub.Board(""), QWEN, "no_file_for_board", ["rk3576.rkllm", "v1.2.1.rkllm"]),
    (hub.Board("rk3588", ("1.0.0",)), QWEN, "no_file_for_board", ["v1.1.4.rkllm"]),
    (hub.Board("rk3588"), QWEN + "/nothing.rkllm", "file_not_found", ["rk3576.rkllm"]),
    (hub.Board("rk3588"), QWEN + "/config.json", "not_a_model", []),
    (hub.Board("rk3588"), "acme/missing", "repo_not_found", ["owner/name"]),
])
def test_refusals_say_what_the_repo_has_and_leave_nothing(fake_hub, tmp_path, board, spec,
                                                          code, names):
    with pytest.raises(hub.PullError) as refused:
        pull(fake_hub, tmp_path, board, spec)
    assert refused.value.code == code
    for name in names:
        assert name in refused.value.message
    assert os.listdir(tmp_path) == []
    assert not [r for r in fake_hub.requests if "/resolve/" in r[1]]


def test_naming_the_file_picks_it_whatever_the_board(fake_hub, tmp_path):
    model_id, _ = pull(fake_hub, tmp_path, hub.Board("rk3576"),
                       QWEN + "/qwen3-0.6b-w8a8-rk3588-v1.1.4.rkllm")
    assert model_id == "qwen3-0.6b-w8a8-rk3588-v1.1.4"


def test_a_download_cut_half_way_resumes(fake_hub, tmp_path):
    fake_hub.cuts[TINY_FILE] = 1
    pull(fake_hub, tmp_path, hub.Board(""), TINY)
    ranges = fake_hub.gets_of(TINY_FILE)
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1].startswith("bytes=") and int(ranges[1][6:].split("-")[0]) > 0
    with open(tmp_path / "tiny-chat" / "tiny-chat.rkllm", "rb") as fh:
        assert hashlib.sha256(fh.read()).digest() == hashlib.sha256(
            REPOS[TINY][TINY_FILE]).digest()


def test_a_pull_cut_for_good_resumes_on_the_next_pull(fake_hub, tmp_path):
    fake_hub.cuts[TINY_FILE] = 100   # every retry of huggingface_hub is cut too
    with pytest.raises(hub.PullError) as refused:
        pull(fake_hub, tmp_path, hub.Board(""), TINY)
    assert refused.value.code == "download_cut" and "pull again" in refused.value.message
    assert os.listdir(tmp_path) == [".pull-tiny-chat"]   # hidden: not a model
    fake_hub.cuts.clear()
    fake_hub.requests.clear()
    pull(fake_hub, tmp_path, hub.Board(""), TINY)
    first = fake_hub.gets_of(TINY_FILE)[0]
    assert first is not None and int(first[6:].split("-")[0]) > 0
    assert folder_listing(tmp_path) == {"tiny-chat": ["tiny-chat.rkllm", "tokenizer_config.json"]}


def test_a_corrupted_file_is_refused_and_leaves_nothing(fake_hub, tmp_path):
    fake_hub.corrupt.add("qwen3-0.6b-w8a8-rk3576.rkllm")
    with pytest.raises(hub.PullError) as refused:
        pull(fake_hub, tmp_path, hub.Board("rk3576"), QWEN)
    assert refused.value.code == "checksum_mismatch"
    assert "qwen3-0.6b-w8a8-rk3576.rkllm" in refused.value.message
    assert os.listdir(tmp_path) == []


def test_a_listed_path_that_leaves_the_repo_is_never_written(fake_hub, tmp_path):
    # A hostile HF_ENDPOINT listing "../../x.rkllm": the download would write it beside
    # (or above) the models root. Such paths are not files of the repo.
    root = tmp_path / "deep" / "models"
    root.mkdir(parents=True)
    fake_hub.repos["evil/escape"] = {"../../escape.rkllm": b"MODEL" * 10,
                                     "models/../../../tokenizer.json": b"{}"}
    with pytest.raises(hub.PullError) as refused:
        pull(fake_hub, root, hub.Board("rk3588"), "evil/escape")
    assert refused.value.code == "no_model_file"
    written = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path)
               for name in names]
    assert written == []


def test_a_corrupted_small_file_is_refused_by_its_git_blob_id(fake_hub, tmp_path):
    fake_hub.corrupt.add("tokenizer.json")
    with pytest.raises(hub.PullError) as refused:
        pull(fake_hub, tmp_path, hub.Board("rk3576"), QWEN)
    assert refused.value.code == "checksum_mismatch" and "tokenizer.json" in refused.value.message
    assert os.listdir(tmp_path) == []


def test_a_model_larger_than_the_free_disk_is_refused_before_downloading(fake_hub, tmp_path):
    fake_hub.huge.add("qwen3-0.6b-w8a8-rk3576.rkllm")   # the listing says 1 TB
    with pytest.raises(hub.PullError) as refused:
        pull(fake_hub, tmp_path, hub.Board("rk3576"), QWEN)
    assert refused.value.code == "disk_full" and refused.value.status == 507
    assert "RKLLM_MODELS_ROOT" in refused.value.message
    assert not [r for r in fake_hub.requests if "/resolve/" in r[1]]
    assert os.listdir(tmp_path) == []


def test_a_pull_already_running_is_joined(fake_hub, tmp_path):
    service = PullService(Settings(models_root=str(tmp_path)),
                          hub.Puller(str(tmp_path), hub.Board("rk3576"), endpoint=fake_hub.url))
    fake_hub.hold.clear()   # file downloads wait until both requests are in
    first = service.start(QWEN)
    second = service.start(" " + QWEN.upper() + " ")
    assert second is first
    fake_hub.hold.set()
    events_first, events_second = list(first.follow()), list(second.follow())
    assert events_first == events_second and events_first[-1]["status"] == "success"
    assert len(fake_hub.gets_of("qwen3-0.6b-w8a8-rk3576.rkllm")) == 1


@pytest.mark.parametrize("spec", ["", "  ", "owner", "a/b/../c", "a/b//c", "-x/y", 5, None,
                                  "owner/na me"])
def test_malformed_names_are_refused(spec):
    with pytest.raises(hub.PullError) as refused:
        hub.parse_spec(spec)
    assert refused.value.status == 400


def test_hub_prefixes_are_accepted():
    assert hub.parse_spec("hf.co/acme/tiny-chat") == ("acme/tiny-chat", "")
    assert hub.parse_spec("https://huggingface.co/acme/x/sub/f.rkllm") == ("acme/x", "sub/f.rkllm")


def test_the_same_file_under_another_name_is_not_pulled_twice_at_once(fake_hub, tmp_path):
    service = PullService(Settings(models_root=str(tmp_path)),
                          hub.Puller(str(tmp_path), hub.Board(""), endpoint=fake_hub.url))
    fake_hub.hold.clear()
    first = service.start(TINY)
    events = first.follow()
    while next(events).get("digest") is None:   # until the first pull is downloading
        pass
    second = service.start(TINY + "/" + TINY_FILE)
    assert second is not first
    refusal = list(second.follow())[-1]
    assert refusal["code"] == "pull_running" and refusal["status_code"] == 409
    fake_hub.hold.set()
    assert list(events)[-1]["status"] == "success"
    assert folder_listing(tmp_path) == {"tiny-chat": ["tiny-chat.rkllm", "tokenizer_config.json"]}
