"""keel.metrics: every metric on small hand-made batches, values worked out in the comments."""

import json
import math

import numpy as np
import pytest

from keel.metrics import (
    CONNECTIVES,
    RESPONSE_KEYS,
    clean_for_json,
    count_connectives,
    regularizer_balance,
    repetition_ratio,
    response_metrics,
    words,
)

ISSUE_LIST = (
    "alternatively, although, and, because, but, either, even, hence, however, if, just, maybe, nevertheless, "
    "neither, nor, only, or, perhaps, possibly, probably, since, so, still, then, therefore, though, thus, while, yet"
)


def test_connectives_are_the_issue_list():
    assert CONNECTIVES == frozenset(w.strip() for w in ISSUE_LIST.split(","))
    assert len(CONNECTIVES) == 29


def test_words_lowercases_and_splits_on_non_word_characters():
    assert words("However, 3+4=7!") == ["however", "3", "4", "7"]
    assert words("either-or\nTHEN\tso...") == ["either", "or", "then", "so"]
    assert words("") == []


@pytest.mark.parametrize(
    "text, expected",
    [
        # however, if, then, so, and, or, and -> 7 ("x", "0", "y" are not connectives)
        ("However, if x>0 then y; so... And/or, AND.", 7),
        ("either-or", 2),  # the hyphen becomes a space
        ("THUS", 1),
        ("Android sonata justify ifs", 0),  # whole words only
        ("", 0),
        (" 8+5=13 carry 1, then 3+4+1=8, so the answer is 83.", 2),  # the embedded task's "full" style
    ],
)
def test_count_connectives(text, expected):
    assert count_connectives(text) == expected


def test_repetition_ratio_by_hand():
    # words a b c a b c: trigrams abc bca cab abc -> 4 total, 3 unique -> 1 - 3/4
    assert repetition_ratio("a b c a b c", 3) == pytest.approx(0.25)
    # unigrams: 6 words, 3 unique -> 1 - 3/6
    assert repetition_ratio("a b c a b c", 1) == pytest.approx(0.5)
    # punctuation and case are normalised like the connectives: same words as above
    assert repetition_ratio("A, b. C a B c", 3) == pytest.approx(0.25)
    assert repetition_ratio("the the the the", 2) == pytest.approx(1 - 1 / 3)  # bigrams: 3 total, 1 unique
    assert repetition_ratio("no repeats here at all", 3) == 0.0


def test_repetition_ratio_undefined_when_too_short():
    assert repetition_ratio("a b", 3) is None
    assert repetition_ratio("", 1) is None
    with pytest.raises(ValueError):
        repetition_ratio("a b c", 0)


def batch():
    # B = 2 prompts, G = 2 completions each (group-major)
    responses = [
        "so the answer is 5",  # 1 connective, 5 words -> 3 trigrams, all unique -> 0
        "I think 4",  # 0 connectives, 1 trigram -> 0
        "because 2 and 2 and 2 and 2",  # because + 3x and = 4; 6 trigrams, 3 unique -> 0.5
        "no",  # 0 connectives, no trigram -> None
    ]
    scores = [1.0, 0.0, 0.5, 0.0]
    lengths = [10, 4, 16, 2]
    return responses, scores, lengths


def test_response_metrics_by_hand():
    m = response_metrics(*batch(), max_response_length=16, group_size=2, ngram=3)
    assert set(m) == set(RESPONSE_KEYS)
    assert m["critic/score/mean"] == pytest.approx(1.5 / 4)
    assert m["score/mean"] == m["critic/score/mean"]
    assert m["critic/score/max"] == 1.0 and m["critic/score/min"] == 0.0
    assert m["token/logical_connectives"] == pytest.approx((1 + 0 + 4 + 0) / 4)
    assert m["pos_token/logical_connectives"] == pytest.approx((1 + 4) / 2)  # scores 1.0 and 0.5
    assert m["neg_token/logical_connectives"] == 0.0
    assert m["token/repetition_ratio"] == pytest.approx((0 + 0 + 0.5) / 3)  # the 1-word response has no trigram
    assert m["response_length/mean"] == pytest.approx(8.0)
    assert m["response_length/max"] == 16.0 and m["response_length/min"] == 2.0
    assert m["response_length/clip_ratio"] == pytest.approx(0.25)  # one of four reached 16
    assert m["response_length/pos/mean"] == pytest.approx((10 + 16) / 2)
    assert m["response_length/neg/mean"] == pytest.approx((4 + 2) / 2)
    # groups [1.0, 0.0] and [0.5, 0.0]: both mixed -> valid 1, none solved by all, none solved by none
    assert (m["batch/valid"], m["batch/solve_all"], m["batch/solve_none"]) == (1.0, 0.0, 0.0)


def test_batch_group_fractions():
    # B = 3, G = 2: [1, 1] all solved (not valid), [0, 0] none solved (not valid), [0.5, 0.2] all solved, valid
    m = response_metrics(["a"] * 6, [1, 1, 0, 0, 0.5, 0.2], [3] * 6, max_response_length=8, group_size=2)
    assert m["batch/valid"] == pytest.approx(1 / 3)
    assert m["batch/solve_all"] == pytest.approx(2 / 3)
    assert m["batch/solve_none"] == pytest.approx(1 / 3)
    assert m["response_length/clip_ratio"] == 0.0


def test_no_positive_response_gives_none_not_nan():
    responses, _, lengths = batch()
    m = response_metrics(responses, [0.0, -1.0, 0.0, 0.0], lengths, max_response_length=16, group_size=2)
    assert m["pos_token/logical_connectives"] is None
    assert m["response_length/pos/mean"] is None
    assert m["neg_token/logical_connectives"] == pytest.approx(5 / 4)
    assert m["response_length/neg/mean"] == pytest.approx(8.0)
    assert m["batch/solve_none"] == 1.0 and m["batch/solve_all"] == 0.0
    json.dumps(m, allow_nan=False)  # serialisable as-is


def test_all_positive_and_too_short_for_ngrams():
    m = response_metrics(["5", "6"], [1.0, 1.0], [1, 1], max_response_length=4, group_size=2)
    assert m["response_length/neg/mean"] is None and m["neg_token/logical_connectives"] is None
    assert m["token/repetition_ratio"] is None  # no response has 3 words
    assert m["batch/valid"] == 0.0 and m["batch/solve_all"] == 1.0


def test_empty_batch_is_all_none():
    m = response_metrics([], [], [], max_response_length=4, group_size=2)
    assert m == dict.fromkeys(RESPONSE_KEYS)


def test_response_metrics_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="differ in length"):
        response_metrics(["a", "b"], [1.0], [1, 1], max_response_length=4, group_size=2)
    with pytest.raises(ValueError, match="groups of 2"):
        response_metrics(["a", "b", "c"], [1, 1, 1], [1, 1, 1], max_response_length=4, group_size=2)


def test_regularizer_balance():
    m = regularizer_balance(entropy=2.0, kl_loss=0.5, entropy_coeff=0.01, kl_coef=0.1)
    assert m["actor/entropy_bonus"] == pytest.approx(0.02)  # 0.01 * 2.0
    assert m["actor/kl_penalty"] == pytest.approx(0.05)  # 0.1 * 0.5
    assert (m["actor/entropy_coeff"], m["actor/kl_coef"]) == (0.01, 0.1)
    assert regularizer_balance(1.0, None, 0.0, 0.0)["actor/kl_penalty"] is None  # no KL loss this run
    assert regularizer_balance(None, 0.5, 0.01, 0.1)["actor/entropy_bonus"] is None


def test_clean_for_json():
    raw = {
        "nan": float("nan"), "inf": math.inf, "np32": np.float32(1.5), "np_int": np.int64(3), "zero_d": np.array(2.5),
        "nested": {"x": -np.inf, "y": [np.nan, 1]}, "none": None, "flag": np.bool_(True), "text": "ok",
    }  # fmt: skip
    out = clean_for_json(raw)
    assert out == {"nan": None, "inf": None, "np32": 1.5, "np_int": 3, "zero_d": 2.5,
                   "nested": {"x": None, "y": [None, 1]}, "none": None, "flag": True, "text": "ok"}  # fmt: skip
    assert type(out["np32"]) is float and type(out["np_int"]) is int and type(out["flag"]) is bool
    json.dumps(out, allow_nan=False)
    assert math.isnan(raw["nan"])  # the input is not modified
