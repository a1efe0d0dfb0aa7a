"""The repetition-loop guard on hand-made texts, fed as a stream would feed it."""
import random
import string

import pytest

from rkllm_api.engine.repetition import RepetitionGuard

SENTENCE = "The capital of France is Paris, a city known for art and food.\n\n"
PARAGRAPH = ("Paris is the capital of France. It has many museums, like the Louvre, and a "
             "famous tower built in 1889 for a world fair. People visit it from everywhere, "
             "and its cafes are full all year long, even in winter.\n\n")


def chars_until_detected(text, guard=None, step=1):
    """How many characters were fed when the guard fired, or None."""
    guard = guard or RepetitionGuard(window=200, threshold=3)
    for at in range(0, len(text), step):
        if guard.feed(text[at:at + step]):
            return min(at + step, len(text))
    return None


def varied_text(words=5000, seed=7):
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
                  for _ in range(300)]
    sentences = []
    for _ in range(words // 12):
        sentence = " ".join(rng.choice(vocabulary) for _ in range(12))
        sentences.append(sentence.capitalize() + rng.choice([". ", "! ", "?\n", ".\n\n"]))
    return "".join(sentences)


def test_sentence_repeated_threshold_times_is_caught_on_the_third_copy():
    fed = chars_until_detected(SENTENCE * 10)
    assert fed is not None
    assert 2 * len(SENTENCE) < fed <= 3 * len(SENTENCE)


def test_long_paragraph_loop_is_caught_within_window_of_its_third_copy():
    assert len(PARAGRAPH) > 200
    fed = chars_until_detected(PARAGRAPH * 10)
    assert fed is not None
    assert 2 * len(PARAGRAPH) + 200 <= fed <= 2 * len(PARAGRAPH) + 200 + 40


def test_two_copies_are_not_a_loop():
    assert chars_until_detected(SENTENCE * 2 + "And then something else entirely.\n") is None
    assert chars_until_detected(PARAGRAPH * 2 + SENTENCE) is None


def test_short_phrase_loop_is_caught_through_a_multiple_of_it():
    fed = chars_until_detected("Sorry. " * 100)
    assert fed is not None and fed < 100


def test_ordinary_text_is_never_flagged():
    assert chars_until_detected(varied_text(), step=4) is None


def test_threshold_two_stops_on_the_second_copy():
    guard = RepetitionGuard(window=200, threshold=2)
    fed = chars_until_detected(SENTENCE * 5, guard)
    assert len(SENTENCE) < fed <= 2 * len(SENTENCE)


def test_units_shorter_than_min_chars_or_without_letters_are_ignored():
    assert chars_until_detected("\n" * 2000) is None
    assert chars_until_detected("-" * 2000) is None
    assert chars_until_detected("=== ---\n" * 300) is None


@pytest.mark.parametrize("window,threshold", [(0, 3), (200, 1), (200, 0)])
def test_zero_window_or_threshold_below_two_disables_the_guard(window, threshold):
    guard = RepetitionGuard(window=window, threshold=threshold)
    assert not guard.enabled
    assert chars_until_detected(SENTENCE * 20, guard) is None


def test_detection_is_sticky_and_loop_after_ordinary_text_is_found():
    guard = RepetitionGuard(window=200, threshold=3)
    assert chars_until_detected(varied_text(800) + SENTENCE * 4, guard, step=3) is not None
    assert guard.detected and guard.feed("anything")


def test_multibyte_text_loops_are_caught():
    line = "東京は日本の首都であり、多くの人が住んでいる大きな都市です。\n"
    assert chars_until_detected(line * 6) is not None
