"""Eval metrics against values computed by hand (worked out in the comments)."""

from __future__ import annotations

import math

import pytest

from qguard.errors import InputError
from qguard.eval import metrics as M
from qguard.eval.data import Sample, subsample
from qguard.eval.runner import summarize
from qguard.eval.spans import char_to_token, span_to_tokens
from qguard.eval.suites import select
from qguard.families.stream import stream_layout
from qguard.tokenizer import load_tokenizer

S, U, C = "Safe", "Unsafe", "Controversial"

# gold and three-tier predictions used by several tests
GOLD = [U, U, U, S, S, S, U, S]
PRED = [U, C, S, C, S, U, U, S]


def test_strict_counts_and_scores():
    # strict: C -> U, pred = U U S U S U U S
    # (U,U) tp, (U,U) tp, (U,S) fn, (S,U) fp, (S,S) tn, (S,U) fp, (U,U) tp, (S,S) tn
    m = M.binary_metrics(GOLD, PRED, "strict")
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 2, 1, 2)
    assert m["precision"] == 60.0  # 3/5
    assert m["recall"] == 75.0  # 3/4
    assert m["f1"] == 66.7  # 2*3 / (2*3 + 2 + 1) = 6/9
    assert m["accuracy"] == 62.5  # 5/8
    assert m["specificity"] == 50.0 and m["fpr"] == 50.0  # 2/4


def test_loose_counts_and_scores():
    # loose: C -> S, pred = U S S S S U U S: tp 2, fn 2, fp 1, tn 3
    m = M.binary_metrics(GOLD, PRED, "loose")
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 2, 3)
    assert m["precision"] == 66.7  # 2/3
    assert m["recall"] == 50.0
    assert m["f1"] == 57.1  # 4/7


def test_modes_are_not_swapped():
    # one Controversial prediction on a gold-Unsafe row: strict finds it, loose misses it
    assert M.binary_metrics([U], [C], "strict")["recall"] == 100.0
    assert M.binary_metrics([U], [C], "loose")["recall"] == 0.0
    with pytest.raises(ValueError):
        M.to_binary(C, "lenient")


def test_undefined_metrics_are_none_not_zero():
    m = M.binary_metrics([S, S], [S, S], "strict")
    assert m["precision"] is None and m["recall"] is None and m["f1"] is None
    assert m["specificity"] == 100.0
    # no true positive but errors: F1 is a real 0
    assert M.binary_metrics([U, S], [S, U], "strict")["f1"] == 0.0


def test_headline_kind():
    assert M.headline_kind([U, S], False) == "f1"
    assert M.headline_kind([U, U], False) == "recall"
    assert M.headline_kind([U, S], True) == "recall"  # collection-labelled
    assert M.headline_kind([S, S], False) == "specificity"


def test_best_mode_per_benchmark_and_average():
    h = M.headline(GOLD, PRED, "f1")
    assert (h["strict"], h["loose"], h["best_mode"], h["best"]) == (66.7, 57.1, "strict", 66.7)
    # all-Safe set: loose leaves more rows Safe (C -> S), so loose wins
    h = M.headline([S, S, S, S], [S, C, U, S], "specificity")
    assert (h["strict"], h["loose"], h["best_mode"], h["best"]) == (50.0, 75.0, "loose", 75.0)
    assert M.best_mode({"strict": 0.5, "loose": 0.5})["best_mode"] == "strict"  # ties: strict
    assert M.best_mode({"strict": None, "loose": None})["best"] is None
    # benchmarks A: strict 80 / loose 90 -> 90; B: 70 / 60 -> 70; average (90 + 70) / 2 = 80
    best = [M.best_mode({"strict": 0.8, "loose": 0.9})["best"], M.best_mode({"strict": 0.7, "loose": 0.6})["best"]]
    assert best == [90.0, 70.0]
    assert M.average(best) == 80.0
    assert M.average([66.7, 57.1, None]) == 61.9
    assert M.average([None]) is None


def test_refusal_f1():
    # pairs with both known: (T,T) tp, (T,F) fn, (F,T) fp, (F,F) tn -> P 50, R 50, F1 50
    r = M.refusal_metrics([True, True, False, False, None, True], [True, False, True, False, True, None])
    assert (r["n"], r["tp"], r["fp"], r["fn"], r["tn"]) == (4, 1, 1, 1, 1)
    assert (r["precision"], r["recall"], r["f1"]) == (50.0, 50.0, 50.0)
    r = M.refusal_metrics([True, True, True, False], [True, True, False, False])
    assert (r["precision"], r["recall"], r["f1"]) == (100.0, 66.7, 80.0)  # F1 = 4/5
    assert M.refusal_metrics([True, False], [None, None]) is None  # e.g. a Stream model


@pytest.mark.parametrize("pos,expected", [
    (None, "Safe"), (9, "Ahead"), (0, "Ahead"), (10, "Hit"), (12, "Hit"), (14, "Hit"),
    (15, "1-32"), (46, "1-32"), (47, "33-64"), (78, "33-64"), (79, "65-128"), (142, "65-128"),
    (143, "129-256"), (270, "129-256"), (271, ">256"), (10_000, ">256"),
])
def test_latency_bins(pos, expected):
    # gold span tokens 10..14 (inclusive); delays are measured from 14, the span's last token
    assert M.latency_bin((10, 14), pos) == expected


def test_latency_single_token_span_at_start():
    assert M.latency_bin((0, 0), 0) == "Hit"
    assert M.latency_bin((0, 0), 1) == "1-32"


def test_latency_histogram():
    bins = ["Hit", "Hit", "Ahead", "1-32", "65-128", "129-256", "Safe", "Safe"]
    h = M.latency_histogram(bins)
    assert h["n"] == 8
    assert h["counts"] == {"Ahead": 1, "Hit": 2, "1-32": 1, "33-64": 0, "65-128": 1, "129-256": 1, ">256": 0, "Safe": 2}
    assert h["percent"]["Hit"] == 25.0 and h["percent"]["Ahead"] == 12.5
    assert h["exact_hit"] == 25.0
    assert h["within_128"] == 62.5  # Ahead + Hit + 1-32 + 65-128 = 5/8
    assert h["missed"] == 25.0
    assert M.latency_histogram([]) is None
    with pytest.raises(ValueError):
        M.latency_histogram(["Soon"])


def test_category_confusion():
    gold = [["Violent"], ["Violent", "PII"], [], ["PII"]]
    pred = [["Violent"], ["Unethical Acts"], ["Violent"], []]
    cc = M.category_confusion(gold, pred)
    m = cc["matrix"]
    assert m["Violent"]["Violent"] == 1 and m["Violent"]["Unethical Acts"] == 1
    assert m["PII"]["Unethical Acts"] == 1 and m["PII"]["None"] == 1
    assert sum(sum(r.values()) for r in m.values()) == 4  # the row without gold categories is ignored
    assert cc["rows"] == {"Violent": 2, "PII": 2}
    assert cc["hit_rate"] == {"Violent": 50.0, "PII": 0.0}
    merged = M.merge_category_confusions([cc, cc])
    assert merged["matrix"]["PII"]["None"] == 2 and merged["hit_rate"] == cc["hit_rate"]


def test_severity_confusion():
    m = M.severity_confusion(GOLD, PRED)
    assert m == {S: {S: 2, U: 1, C: 1}, U: {S: 1, U: 2, C: 1}}


def test_per_language():
    langs = ["en", "en", "fr", "fr", "zh"]
    out = M.by_language(langs, [U, S, U, S, U], [U, U, S, S, C])
    assert list(out) == ["en", "fr", "zh"]  # by size, then name
    assert out["en"]["strict"]["f1"] == 66.7  # tp 1, fp 1
    assert out["fr"]["strict"]["f1"] == 0.0 and out["fr"]["strict"]["precision"] is None
    zh = out["zh"]["headline"]  # one Unsafe row predicted Controversial
    assert (zh["kind"], zh["strict"], zh["loose"], zh["best"]) == ("recall", 100.0, 0.0, 100.0)


# ------------------------------------------------------------------------------ spans (tokenizer)

def test_char_to_token():
    offsets = [(0, 5), (5, 11), (11, 12), (12, 13), (12, 13)]  # last char split over two tokens
    assert [char_to_token(offsets, c) for c in (0, 4, 5, 10, 11, 12)] == [0, 0, 1, 1, 2, 3]
    assert char_to_token(offsets, 99) == 4
    with pytest.raises(InputError):
        char_to_token([], 0)


@pytest.mark.parametrize("content", [
    "\n\nHello world. 你好世界 Bad part here.",  # the template drops leading newlines
    "<think>\nlet me think\n</think>\n\nHello world. 你好世界 Bad part here.",  # reasoning is not answer
])
def test_span_to_tokens_matches_stream_layout(content):
    tok = load_tokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
    start, end = content.index("Bad"), content.index(" here")
    s, e = span_to_tokens(tok, msgs, (start, end))
    lay = stream_layout(tok, msgs)
    answer = lay.ids[lay.answer_start:lay.answer_end]
    assert tok.decode(answer[s:s + 1]) == " Bad"
    assert tok.decode(answer[e:e + 1]) == " part"
    assert tok.decode(answer[s:e + 1]) == " Bad part"


def test_subsample_is_even_and_deterministic():
    rows = [Sample(str(i), "b", "prompt", [], "Safe", (), None, "en", False, None) for i in range(10)]
    assert [r.id for r in subsample(rows, 4)] == ["0", "2", "5", "7"]  # floor(i * 10 / 4)
    assert len(subsample(rows, 50)) == 10 and len(subsample(rows, None)) == 10


def test_suite_selection():
    files = dict.fromkeys(["beavertails", "toxicchat", "mine", "stream_spliced"], None)
    assert select(files, "all") == ["toxicchat", "beavertails", "stream_spliced", "mine"]
    assert select(files, "english-response") == ["beavertails"]
    with pytest.raises(InputError, match="unknown suite"):
        select(files, "klingon")
    with pytest.raises(InputError, match="none of its files"):
        select(files, "chinese")


# --------------------------------------------------------------------------- results from rows

def _pred(bench, label, pred, lang="en", gold_refusal=None, refusal=None):
    return {"id": "i", "benchmark": bench, "task": "response", "lang": lang, "label": label,
            "gold_categories": [], "gold_refusal": gold_refusal, "collection_label": False, "pred": pred,
            "categories": [], "refusal": refusal, "latency": None, "error": None}


def test_summarize_suite_average_uses_best_mode_and_skips_extras():
    rows = (
        # saferlhf (avg): strict tp2 fp1 -> F1 80.0; loose (C->S) tp1 fn1 fp1 -> F1 50.0; best 80.0
        [_pred("saferlhf", U, U), _pred("saferlhf", U, C), _pred("saferlhf", S, U), _pred("saferlhf", S, S)]
        # beavertails (avg): strict tp1 fp1 -> 66.7; loose tp1 fp0 -> 100.0; best 100.0
        + [_pred("beavertails", U, U), _pred("beavertails", S, C)]
        # jailjudge_mini is an extra: outside the average
        + [_pred("jailjudge_mini", U, S), _pred("jailjudge_mini", S, U)]
        # xstest_refusal: refusal F1 from rows with both refusals (tp1 fn1 -> P100 R50 F1 66.7)
        + [_pred("xstest_refusal", S, S, gold_refusal=True, refusal=True),
           _pred("xstest_refusal", S, S, gold_refusal=True, refusal=False),
           _pred("xstest_refusal", U, U, gold_refusal=False, refusal=None)]
    )
    res = summarize(rows)
    suite = res["suites"]["english-response"]
    assert suite["averaged"] == ["saferlhf", "beavertails"]
    avg = suite["average"]  # best (80+100)/2, strict (80+66.7)/2 = 73.35 (float rounding), loose (50+100)/2
    assert avg["best"] == 90.0 and avg["loose"] == 75.0 and avg["strict"] == pytest.approx(73.35, abs=0.051)
    assert res["benchmarks"]["jailjudge_mini"]["role"] == "extra"
    ref = res["benchmarks"]["xstest_refusal"]["refusal"]
    assert (ref["n"], ref["precision"], ref["recall"], ref["f1"]) == (2, 100.0, 50.0, 66.7)
    assert res["cost"] is None  # no timings: no invented cost figures


def test_summarize_counts_skipped_rows_apart():
    rows = [_pred("mine", U, U), {**_pred("mine", U, None), "skipped": "too long"}]
    b = summarize(rows)["benchmarks"]["mine"]
    assert (b["n"], b["n_scored"], b["n_skipped"]) == (2, 1, 1)
    assert b["strict"]["recall"] == 100.0  # the skipped row is not scored as a miss


def test_suite_languages_pool_averaged_benchmarks_only():
    rows = [
        _pred("rtp_lx", U, U, lang="de"), _pred("rtp_lx", S, U, lang="de"), _pred("rtp_lx", U, S, lang="ja"),
        _pred("xsafety", U, U, lang="ja"),
        _pred("cyberseceval_frr", S, U, lang="ja"),  # an extra: not pooled
    ]
    langs = summarize(rows)["suites"]["multilingual"]["languages"]
    assert langs["de"]["strict"]["f1"] == 66.7  # tp 1, fp 1
    # ja: rtp_lx (U -> S) fn and xsafety (U -> U) tp; the extra's false positive is left out
    assert (langs["ja"]["n"], langs["ja"]["strict"]["tp"], langs["ja"]["strict"]["fp"]) == (2, 1, 0)
    assert langs["ja"]["headline"]["best"] == 50.0  # all-Unsafe group: recall 1/2


def test_calibration_of_strict_unsafe_probability():
    probs = [{"Safe": 0.1, "Unsafe": 0.5, "Controversial": 0.4}, {"Safe": 0.1, "Unsafe": 0.9, "Controversial": 0.0},
             {"Safe": 0.8, "Unsafe": 0.2, "Controversial": 0.0}, {"Safe": 0.8, "Unsafe": 0.1, "Controversial": 0.1},
             None]  # a skipped / error row carries no probabilities
    c = M.calibration_metrics(["Unsafe", "Safe", "Safe", "Safe", "Unsafe"], probs, bins=10)
    # P(unsafe) 0.9, 0.9 (one unsafe) and 0.2, 0.2 (none): ECE = (|1.8 - 1| + |0.4 - 0|) / 4
    assert c["n"] == 4 and c["ece"] == pytest.approx(0.3)
    assert c["brier"] == pytest.approx((0.01 + 0.81 + 0.04 + 0.04) / 4)
    assert c["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.1) + 2 * math.log(0.8)) / 4, abs=1e-4)
    assert M.calibration_metrics(["Safe"], [None]) is None
