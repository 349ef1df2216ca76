import json

import pytest

from qguard.errors import InputError, LabelError
from qguard.policy import (
    VERDICT_FIELDS,
    Action,
    Category,
    Debouncer,
    DebounceRule,
    Mode,
    Policy,
    Severity,
    debounce,
    label_map,
    parse_category,
    parse_severity,
    resolve_policy,
)

S, U, C = Severity.SAFE, Severity.UNSAFE, Severity.CONTROVERSIAL


@pytest.mark.parametrize("name,cat", [
    ("Violent", Category.VIOLENT), ("violence", Category.VIOLENT),
    ("Sexual Content", Category.SEXUAL), ("Sexual Content or Sexual Acts", Category.SEXUAL),
    ("Self-Harm", Category.SELF_HARM), ("Suicide & Self-Harm", Category.SELF_HARM),
    ("Political", Category.POLITICAL), ("politically_sensitive_topics", Category.POLITICAL),
    ("pii", Category.PII), ("Copyright", Category.COPYRIGHT), ("Non-violent Illegal Acts", Category.NON_VIOLENT_ILLEGAL),
    ("Unethical Acts", Category.UNETHICAL), ("Jailbreak", Category.JAILBREAK),
])
def test_category_aliases(name, cat):
    assert parse_category(name) is cat


def test_unknown_labels_fail_loudly():
    with pytest.raises(LabelError, match="unknown category 'Weapons'"):
        parse_category("Weapons")
    with pytest.raises(LabelError, match="unknown risk level"):
        parse_severity("Maybe")


def test_label_map_string_keys_sorted_numerically():
    m = {str(i): n for i, n in enumerate(["Safe", "Unsafe", "Controversial"] + [])}
    assert label_map(m, parse_severity, (), "x") == (S, U, C)
    ten = {str(i): "Safe" for i in range(11)}
    assert len(label_map(ten, parse_severity, (), "x")) == 11  # "10" after "9", not after "1"
    with pytest.raises(LabelError, match="class indices"):
        label_map({"0": "Safe", "2": "Unsafe"}, parse_severity, (), "x")
    with pytest.raises(LabelError, match="query_category_map: unknown category"):
        label_map({"0": "Nope"}, parse_category, (), "query_category_map")


def test_modes():
    assert Policy(mode="strict").binary(C) is U
    assert Policy(mode="loose").binary(C) is S
    assert Policy(mode="loose").binary(U) is U


def test_actions_and_threshold():
    p = Policy(actions={"Politically Sensitive Topics": "flag", Category.PII: "allow"})
    assert p.action_for(U, [Category.POLITICAL], None) is Action.FLAG
    assert p.action_for(U, [Category.PII], None) is Action.ALLOW
    assert p.action_for(U, [Category.PII, Category.VIOLENT], None) is Action.BLOCK
    assert p.action_for(S, [Category.VIOLENT], None) is Action.ALLOW
    assert Policy(mode="loose").action_for(C, [Category.VIOLENT], None) is Action.ALLOW
    t = Policy(block_threshold=0.9)
    assert t.action_for(U, [Category.VIOLENT], {"Safe": 0.3, "Unsafe": 0.7, "Controversial": 0.0}) is Action.FLAG
    assert t.action_for(U, [Category.VIOLENT], {"Safe": 0.05, "Unsafe": 0.6, "Controversial": 0.35}) is Action.BLOCK
    with pytest.raises(ValueError):
        Policy(block_threshold=2)
    v = p.verdict(C, [Category.VIOLENT], probs={"Safe": 0.1, "Unsafe": 0.2, "Controversial": 0.7})
    assert v.binary is U and v.blocked and v.to_dict()["categories"] == ["Violent"]


def test_error_verdict_is_never_safe():
    v = Policy(mode="loose").error_verdict("garbage")
    assert v.is_unsafe and v.error == "garbage" and v.action is Action.FLAG


@pytest.mark.parametrize("labels,eval_,report", [
    ([], (S, None), (S, None)),
    ([U], (S, None), (S, None)),  # a single unsafe token is debounced away
    ([S, U, S, U], (S, None), (S, None)),
    ([S, U, U, S], (U, 2), (U, 2)),
    ([C, C, U, U], (U, 3), (C, 1)),  # eval: Unsafe pair wins over an earlier Controversial pair
    ([S, C, C, S], (C, 2), (C, 2)),
    ([U, C, S], (S, None), (C, 1)),  # report: mixed non-safe pair counts, label of token i
])
def test_debounce_rules(labels, eval_, report):
    assert debounce(labels, DebounceRule.EVAL) == eval_
    assert debounce(labels, DebounceRule.REPORT) == report


@pytest.mark.parametrize("rule", list(DebounceRule))
def test_incremental_debouncer_matches_batch(rule):
    import random

    rng = random.Random(0)
    for _ in range(300):
        labels = [rng.choice([S, S, U, C]) for _ in range(rng.randint(0, 12))]
        d = Debouncer(rule)
        for x in labels:
            d.push(x)
        assert (d.label, d.position) == debounce(labels, rule), labels


def test_apply_rejudges_one_output_under_another_mode():
    strict = Policy(mode="strict").verdict(C, [Category.VIOLENT], probs={"Safe": 0.2, "Unsafe": 0.1, "Controversial": 0.7})
    loose = Policy(mode="loose").apply(strict)
    assert strict.binary is U and strict.blocked
    assert loose.binary is S and loose.action is Action.ALLOW and loose.probs == strict.probs
    err = Policy(mode="loose").apply(Policy().error_verdict("bad"))
    assert err.is_unsafe and err.error == "bad"


@pytest.mark.parametrize("make,msg", [
    (lambda: Policy(mode="medium"), "unknown mode 'medium': use 'strict' or 'loose'"),
    (lambda: Policy(default_action="kill"), "unknown action 'kill': use 'allow', 'flag' or 'block'"),
    (lambda: Policy(actions={"Violent": "nuke"}), "unknown action 'nuke'"),
    (lambda: Policy(actions={"Weapons": "block"}), "actions: unknown category 'Weapons'"),
    (lambda: Policy(actions={7: "block"}), "a category is a name"),
    (lambda: Policy(actions=["Violent"]), "actions must map categories"),
    (lambda: Policy(block_threshold=2), r"block_threshold must be in \[0, 1\]"),
    (lambda: Policy(block_threshold="0.5"), "block_threshold must be a number"),
    (lambda: debounce([], "fast"), "unknown debounce rule 'fast': use 'eval' or 'report'"),
    (lambda: Debouncer("fast"), "unknown debounce rule 'fast'"),
    (lambda: resolve_policy("lax", None), "unknown mode 'lax'"),
    (lambda: resolve_policy(None, {"mode": "strict"}), "policy must be a qguard.policy.Policy"),
])
def test_bad_policy_options_are_input_errors(make, msg):
    with pytest.raises(InputError, match=msg) as e:
        make()
    assert isinstance(e.value, ValueError)  # still caught by code written for Python's bad-argument error


def test_options_ignore_case_and_spaces():
    p = Policy(mode=" Loose", default_action="FLAG", actions={"pii": "Allow"})
    assert (p.mode, p.default_action, p.actions) == (Mode.LOOSE, Action.FLAG, {Category.PII: Action.ALLOW})
    assert Debouncer("REPORT").rule is DebounceRule.REPORT


def test_to_dict_is_one_schema_for_every_verdict():
    full = Policy().verdict(U, [Category.VIOLENT], refusal=False, probs={"Safe": 0.1, "Unsafe": 0.9, "Controversial": 0.0},
                            category_probs={"Violent": 1.0}, unsafe_position=3, n_tokens=9)
    bare = Policy(mode="loose").verdict(S)
    err = Policy().error_verdict("garbage", raw_output="Safety: ???")
    for v in (full, bare, err):
        d = v.to_dict()
        assert tuple(d) == VERDICT_FIELDS  # every key, always, in one order: one schema per dataset column
        assert json.loads(json.dumps(d)) == d
    d = full.to_dict()
    assert (d["action"], d["category_probs"], d["unsafe_position"], d["n_tokens"]) == ("block", {"Violent": 1.0}, 3, 9)
    assert bare.to_dict()["unsafe_position"] is None and bare.to_dict()["mode"] == "loose"
    assert err.to_dict()["error"] == "garbage" and err.to_dict()["binary"] == "Unsafe"


def test_with_mode_keeps_the_actions_and_the_threshold():
    p = Policy(mode="strict", default_action="flag", actions={"PII": "block"}, block_threshold=0.4)
    loose = p.with_mode("loose")
    assert (loose.mode, loose.default_action, loose.actions, loose.block_threshold) == \
        (Mode.LOOSE, Action.FLAG, {Category.PII: Action.BLOCK}, 0.4)
    assert p.mode is Mode.STRICT  # a new policy: the original is not changed
    assert p.with_mode(None) is p and p.with_mode(" STRICT") is p
    with pytest.raises(InputError, match="unknown mode 'lax'"):
        p.with_mode("lax")


def test_the_taxonomy_and_debounce_have_one_home_re_exported_by_the_policy():
    import qguard.debounce
    import qguard.taxonomy

    assert (Severity, Category, parse_category) == (qguard.taxonomy.Severity, qguard.taxonomy.Category,
                                                   qguard.taxonomy.parse_category)
    assert (debounce, Debouncer, DebounceRule) == (qguard.debounce.debounce, qguard.debounce.Debouncer,
                                                  qguard.debounce.DebounceRule)
    assert qguard.taxonomy.SEVERITY_KEYS == tuple(s.value for s in qguard.taxonomy.SEVERITIES) == \
        ("Safe", "Unsafe", "Controversial")


def test_debounce_stops_reading_once_the_verdict_is_final():
    def labels(first):
        yield from first
        raise AssertionError("read past a final verdict")

    assert debounce(labels([S, U, U]), DebounceRule.EVAL) == (U, 2)
    assert debounce(labels([S, C, U]), DebounceRule.REPORT) == (U, 2)


def test_token_verdict_text_is_optional_and_serialised():
    from dataclasses import replace

    from qguard.policy import TOKEN_VERDICT_FIELDS, Part, TokenVerdict

    values = (7, 0, 12, Part.ANSWER, {"Safe": 1.0, "Unsafe": 0.0, "Controversial": 0.0}, {"Violent": 1.0}, S,
              Category.VIOLENT, S, None, False)
    tv = TokenVerdict(*values)
    assert TOKEN_VERDICT_FIELDS[-1] == "text" and tv.text is None and tv.to_dict()["text"] is None
    fast = TokenVerdict._fast(*values)  # the hot path leaves the default out of the instance dict
    assert fast == tv and repr(fast) == repr(tv) and fast.to_dict() == tv.to_dict()
    traced = replace(tv, text=" bomb")
    assert traced.to_dict() == {**tv.to_dict(), "text": " bomb"} and traced != tv
