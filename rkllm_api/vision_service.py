"""Images of a chat request -> the embeddings a vision-language model's run carries.

For a model with a vision encoder (capability "vision": a `.rknn` beside its
`.rkllm`), VisionService.prepare() takes the request's messages (after RAG) and
returns what the chat path needs:

  * every image read (a data URL, or an http(s) URL fetched within limits,
    image_fetch.py), decoded, padded and resized for the encoder (vision.py), run
    through the encoder (rknn_ctypes.RknnEncoder) into float32 rows; a bad image is
    a 400 naming the message and why;
  * the messages with one IMAGE_MARKER in front of each user message's text per image
    it carries (where librkllmrt puts the rows), literal markers in client text
    removed, and each image part keyed by the digest of its bytes (KV keys);
  * the embeddings in conversation order, for RunRequest.images.

Encoders are loaded on a model's first image and stay loaded beside the language
model (a librknnrt context of their own) until unused for IDLE_UNLOAD_TIMEOUT, like
the models themselves (a thread checks every IDLE_CHECK_SECONDS). Encoder outputs
are kept by (model, image digest) in a small LRU, so a follow-up question about an
earlier image does not run the encoder again.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Optional

from rkllm_api import image_fetch, vision
from rkllm_api.engine.errors import EngineError, ModelLoadFailed, QueueTimeout
from rkllm_api.errors import RequestError
from rkllm_api.request import ImagePart, TextPart
from rkllm_api.runtimes import encoder
from rkllm_api.runtimes.base import IMAGE_MARKER, ImageEmbedding

log = logging.getLogger(__name__)

# Requests preparing images at once. A 12 MP photo holds ~100 MB while it is decoded
# and resized and takes a core for up to a second; with 40 request threads, unbounded
# preparation would let a burst of image requests exhaust a board's memory.
PREPARING_AT_ONCE = 2
# URL fetches at once. Fetching happens before a request takes a preparation slot: a
# slow or hostile URL (up to IMAGE_URL_TIMEOUT per image) then holds only other URL
# fetches, never the slots of requests whose images are already here (data URLs).
FETCHING_AT_ONCE = 4
IDLE_CHECK_SECONDS = 10.0


class VisionEncoderFailed(EngineError):
    """The encoder failed on an image the preprocessing accepted (a 500)."""


@dataclass
class _Loaded:
    """A loaded encoder, its input (fixed once loaded: read once, not per image across
    the process boundary), how many requests are using it, and since when it is idle."""
    path: str
    encoder: object
    spec: object                     # rknn_ctypes input spec: size, layout, dtype
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class VisionInput:
    messages: tuple        # with image markers and content digests
    images: tuple          # ImageEmbedding, in conversation order


class VisionService:
    """The encoders of an app's vision models and their output cache. Thread-safe."""

    def __init__(self, settings, encoder_factory=None):
        self.settings = settings
        self.limits = vision.ImageLimits(max_bytes=settings.image_max_bytes,
                                         max_pixels=settings.image_max_pixels,
                                         max_images=settings.image_max_count)
        self.fetch_policy = image_fetch.FetchPolicy(max_bytes=settings.image_max_bytes,
                                                    timeout=settings.image_url_timeout,
                                                    allow_private=settings.image_url_private)
        self._encoder_factory = encoder_factory or self._open_encoder
        self._isolated = None                # IsolatedRuntimes, made on first use
        self._isolation_lock = threading.Lock()
        self._encoders: dict = {}            # model id -> _Loaded
        self._lock = threading.Lock()        # guards _encoders (loading included)
        self._watcher: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._cache: OrderedDict = OrderedDict()   # (model id, digest) -> rows
        self._cache_lock = threading.Lock()
        self._preparing = threading.BoundedSemaphore(PREPARING_AT_ONCE)
        self._fetching = threading.BoundedSemaphore(FETCHING_AT_ONCE)

    # -- the chat path -----------------------------------------------------------

    def prepare(self, info, messages: tuple) -> VisionInput:
        """See the module docstring; raises RequestError (400) for a bad image or a
        model whose image tags are unknown, ModelLoadFailed when the encoder does not
        load, VisionEncoderFailed when it fails."""
        # Images are what users show: only user messages' count (with_markers agrees).
        located = [(m, p, part) for m, message in enumerate(messages) if message.role == "user"
                   for p, part in enumerate(message.parts) if type(part) is ImagePart]
        if len(located) > self.limits.max_images:
            raise RequestError(f"{len(located)} images in the conversation, over the limit "
                               f"of {self.limits.max_images} (IMAGE_MAX_COUNT)",
                               param="messages", code="too_many_images")
        if not located:
            return VisionInput(with_markers(messages), ())
        self._check_tags(info)
        # Every image's bytes first, outside the preparation slots (see FETCHING_AT_ONCE);
        # a bad data URL or URL is refused before an encoder is loaded for it.
        images = [self._image_bytes(part, m, number)
                  for number, (m, _, part) in enumerate(located)]
        if not self._preparing.acquire(timeout=self.settings.queue_timeout_seconds):
            raise QueueTimeout("too many requests are preparing images; try again", 5)
        try:
            entry = self._borrow(info)
            try:
                embeddings, parts = self._embed_all(info, entry, located, images)
            finally:
                self._give_back(info, entry)
        finally:
            self._preparing.release()
        keyed = tuple(replace(message, parts=tuple(parts.get((m, p), part)
                                                   for p, part in enumerate(message.parts)))
                      for m, message in enumerate(messages))
        return VisionInput(with_markers(keyed), tuple(embeddings))

    def _embed_all(self, info, entry: _Loaded, located: list, images: list) -> tuple:
        """([ImageEmbedding], {(message, part): ImagePart with its content digest})."""
        embeddings, parts = [], {}
        spec = entry.spec
        for number, ((m, p, part), data) in enumerate(zip(located, images)):
            digest = hashlib.sha256(data).hexdigest()[:16]
            rows = self._rows(info, entry, data, digest, m, number)
            embeddings.append(ImageEmbedding(rows, digest, spec.width, spec.height))
            parts[(m, p)] = replace(part, content_digest=digest)
        return embeddings, parts

    @staticmethod
    def _check_tags(info) -> None:
        try:
            tags = vision.image_tokens(info.id, info.config)
        except ValueError as exc:
            raise RequestError(f"the model '{info.id}' cannot take images: {exc}",
                               param="model", code="vision_not_configured") from None
        if tags is None:
            raise RequestError(
                f"the model '{info.id}' has a vision encoder but its image tokens are not "
                "known: set \"image_tokens\": {\"start\", \"end\", \"content\"} in its "
                "model_config.json", param="model", code="vision_not_configured")

    def _image_bytes(self, part: ImagePart, message: int, number: int) -> bytes:
        where = f"messages[{message}]"
        url = part.url.strip()
        try:
            if url[:5].lower() == "data:":
                return vision.image_bytes(url, number, self.limits)
            if not self.settings.image_url_fetch:
                raise image_fetch.ImageFetchError("image URLs are turned off (IMAGE_URL_FETCH); "
                                                  "send the image as a data URL")
            if not self._fetching.acquire(timeout=self.settings.queue_timeout_seconds):
                raise QueueTimeout("too many requests are fetching image URLs; try again", 5)
            try:
                return image_fetch.fetch_image(url, self.fetch_policy)
            finally:
                self._fetching.release()
        except vision.ImageError as exc:
            raise _bad_image(where, number, exc.reason) from None
        except image_fetch.ImageFetchError as exc:
            raise _bad_image(where, number, str(exc)) from None

    def _rows(self, info, entry: _Loaded, data: bytes, digest: str, message: int,
              number: int):
        key = (info.id, digest)
        with self._cache_lock:
            rows = self._cache.get(key)
            if rows is not None:
                self._cache.move_to_end(key)
                return rows
        try:
            pixels = vision.preprocess(data, entry.spec,
                                       vision.normalisation_for(info.id, info.config),
                                       number, self.limits)
        except vision.ImageError as exc:
            raise _bad_image(f"messages[{message}]", number, exc.reason) from None
        try:
            output = entry.encoder.encode(pixels)
        except Exception as exc:  # the library's failure: a 500, the log has the detail
            log.error("vision encoder of %s failed: %s", info.id, exc)
            raise VisionEncoderFailed(f"the vision encoder of {info.id} failed") from exc
        rows = output.reshape(-1, output.shape[-1])
        self._remember(key, rows)
        return rows

    def _remember(self, key: tuple, rows) -> None:
        size = self.settings.image_embedding_cache
        if size <= 0:
            return
        with self._cache_lock:
            self._cache[key] = rows
            self._cache.move_to_end(key)
            while len(self._cache) > size:
                self._cache.popitem(last=False)

    # -- encoders ------------------------------------------------------------------

    def _borrow(self, info) -> _Loaded:
        """The model's encoder, loaded on first use (ModelLoadFailed when it cannot),
        marked in use until _give_back: the idle watcher never closes it meanwhile."""
        with self._lock:
            entry = self._encoders.get(info.id)
            dead = entry is not None and not getattr(entry.encoder, "alive", True)
            if dead:   # its process crashed: the next image loads it again
                log.warning("the vision encoder of %s died (%s): loading it again", info.id,
                            getattr(entry.encoder, "crash", ""))
            if entry is None or entry.path != info.vision_encoder or dead:   # new, changed
                entry = self._load(info)
                replaced, self._encoders[info.id] = self._encoders.get(info.id), entry
                if replaced is not None and replaced.users == 0:
                    replaced.encoder.close()
                self._watch_idle()
            entry.users += 1
            return entry

    def _load(self, info) -> _Loaded:
        try:
            encoder = self._encoder_factory(info.vision_encoder, self.settings)
            try:
                return _Loaded(info.vision_encoder, encoder, encoder.input_spec)
            except Exception:
                encoder.close()   # its process must not outlive a failed load
                raise
        except Exception as exc:
            log.error("loading the vision encoder of %s failed: %s", info.id, exc)
            raise ModelLoadFailed(info.id, f"vision encoder: {exc}") from exc

    def _give_back(self, info, entry: _Loaded) -> None:
        with self._lock:
            entry.users -= 1
            entry.last_used = time.monotonic()
            stale = entry.users == 0 and self._encoders.get(info.id) is not entry
        if stale:
            entry.encoder.close()

    def close_idle(self, idle_seconds: float) -> list:
        """Close the encoders unused for idle_seconds; the ids closed. An encoder is
        loaded again by the next image for its model."""
        now = time.monotonic()
        with self._lock:
            idle = [model for model, entry in self._encoders.items()
                    if entry.users == 0 and now - entry.last_used >= idle_seconds]
            closing = [self._encoders.pop(model) for model in idle]
        for entry in closing:
            entry.encoder.close()
        if idle:
            log.info("closed the idle vision encoder of %s", ", ".join(idle))
        return idle

    def _watch_idle(self) -> None:
        """Start (once, with the first encoder) the thread that closes idle encoders
        after IDLE_UNLOAD_TIMEOUT, as the engine unloads idle models. Under _lock."""
        limit = self.settings.idle_unload_seconds
        if self._watcher is not None or limit <= 0:
            return
        def watch():
            while not self._stop.wait(min(IDLE_CHECK_SECONDS, limit)):
                self.close_idle(limit)
        self._watcher = threading.Thread(target=watch, name="vision-encoder-idle",
                                         daemon=True)
        self._watcher.start()

    def loaded(self) -> list:
        with self._lock:
            return sorted(self._encoders)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            encoders, self._encoders = list(self._encoders.values()), {}
        for entry in encoders:
            entry.encoder.close()

    def _open_encoder(self, path: str, settings):
        """The encoder of a .rknn file: in a child process of its own (librknnrt can
        crash like librkllmrt; RUNTIME_ISOLATION), else in this process."""
        if not settings.runtime_isolation:
            import rknn_ctypes  # boards without vision models never load librknnrt
            return rknn_ctypes.RknnEncoder(path, lib_path=encoder.rknn_library(settings))
        with self._isolation_lock:
            if self._isolated is None:
                from rkllm_api.runtimes.isolation import IsolatedRuntimes
                self._isolated = IsolatedRuntimes()
        return self._isolated(path, context_length=0, settings=settings)


def _bad_image(where: str, number: int, reason: str) -> RequestError:
    return RequestError(f"{where}: image {number}: {reason}", param=f"{where}.content",
                        code="invalid_image")


def check_image_roles(messages: tuple) -> None:
    """Images are what users show (prepare() reads only theirs, with_markers marks only
    theirs): an image in a system, assistant or tool message would be dropped without
    a word, so it is a 400, as OpenAI answers it."""
    for index, message in enumerate(messages):
        if message.role != "user" and message.images:
            raise RequestError(f"messages[{index}]: images are taken in user messages only, "
                               f"not in {message.role} messages",
                               param=f"messages[{index}].content", code="invalid_image")


def with_markers(messages: tuple) -> tuple:
    """Each user message with one IMAGE_MARKER per image before its text; literal
    markers removed from every message's text (they would misplace the rows)."""
    marked = []
    for message in messages:
        text = message.text.replace(IMAGE_MARKER, "")
        images = message.images if message.role == "user" else ()
        if images:
            text = IMAGE_MARKER * len(images) + "\n" + text
        if text != message.text:
            message = replace(message, parts=(TextPart(text),) + message.images)
        marked.append(message)
    return tuple(marked)


def routing_target(registry, settings, info) -> Optional[object]:
    """The model a request with images for `info` (no vision) goes to: VISION_MODEL,
    else the first model with vision; None when routing is off or there is none."""
    if not settings.vl_routing:
        return None
    if settings.vision_model:
        target = registry.resolve(settings.vision_model)
        if target is not None and "vision" in target.capabilities and target.available:
            return target
        log.warning("VISION_MODEL %r is not an installed model with vision",
                    settings.vision_model)
    return next((m for m in registry.models() if "vision" in m.capabilities and m.available),
                None)
