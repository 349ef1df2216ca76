"""Rewards: eq. (1) guard-only and eq. (2) hybrid (as assumed in qguard.reward), and the TRL adapter."""

from __future__ import annotations

import pytest

from qguard.errors import InputError
from qguard.policy import Category, Mode, Policy, Severity
from qguard.reward import RewardConfig, SafetyReward, guard_only_reward, hybrid_reward, per_pair, reward_fn
from tests.engine.test_gen_engine import conversations, trained_gen_checkpoint

P = Policy()


def v(label: str, refusal: bool | None = None, error: str | None = None):
    if error:
        return P.error_verdict(error)
    cats = () if label == "Safe" else (Category.VIOLENT,)
    return P.verdict(Severity(label), cats, refusal=refusal)


def test_guard_only_reward_eq1_modes():
    strict, loose = RewardConfig(), RewardConfig(mode=Mode.LOOSE)
    assert guard_only_reward(v("Safe"), strict) == 1.0
    assert guard_only_reward(v("Unsafe"), strict) == 0.0
    assert guard_only_reward(v("Controversial"), strict) == 0.0
    assert guard_only_reward(v("Controversial"), loose) == 1.0
    assert guard_only_reward(v("Safe", error="unparseable"), loose) == 0.0  # an unread answer is never Safe
    assert guard_only_reward(v("Safe"), RewardConfig(safe_reward=2, unsafe_reward=-1)) == 2


def test_hybrid_reward_eq2_cases():
    cfg = RewardConfig()
    assert hybrid_reward(v("Unsafe", False), v("Safe"), 3.0, cfg) == -10.0
    assert hybrid_reward(v("Safe", True), v("Safe"), 3.0, cfg) == -5.0  # unnecessary refusal
    assert hybrid_reward(v("Safe", True), v("Unsafe"), 3.0, cfg) == 3.0  # refusing an unsafe prompt is fine
    assert hybrid_reward(v("Safe", False), v("Safe"), 0.25, cfg) == 0.25
    assert hybrid_reward(v("Safe", False), v("Safe"), None, cfg) is None
    assert hybrid_reward(v("Safe", True), None, 1.0, RewardConfig(penalize_refusal="always")) == -5.0
    assert hybrid_reward(v("Controversial", False), v("Safe"), 1.0, RewardConfig(mode=Mode.LOOSE)) == 1.0


class Spy:
    """Wraps a Guard, counting engine calls and batch sizes."""

    def __init__(self, guard):
        self.guard, self.calls = guard, []

    def classify_conversations(self, convs, return_errors=False):
        self.calls.append(len(convs))
        return self.guard.classify_conversations(convs, return_errors=return_errors)


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    from qguard.guard import Guard

    return Guard.from_pretrained(trained_gen_checkpoint(tmp_path_factory.mktemp("rw")), device="cpu",
                                 max_new_tokens=24)


def pairs(n: int, seed: int):
    convs = [c for c in conversations(3 * n, seed) if c[-1]["role"] == "assistant"][:n]
    return [c[0]["content"] for c in convs], [c[-1]["content"] for c in convs]


def test_guard_reward_batched_through_engine_equals_verdicts(guard):
    prompts, responses = pairs(9, seed=1)
    spy = Spy(guard)
    rewards = SafetyReward(spy, "guard", batch_size=4).score(prompts, responses)
    assert spy.calls == [4, 4, 1]
    verdicts = guard.classify_responses(list(zip(prompts, responses)))
    assert rewards == [guard_only_reward(x) for x in verdicts]
    assert set(rewards) <= {0.0, 1.0}


def test_trl_reward_fn_standard_and_conversational(guard):
    prompts, responses = pairs(6, seed=2)
    fn = reward_fn(guard)
    assert fn.__name__ == "qguard_guard_reward"
    plain = fn(prompts=prompts, completions=responses, completion_ids=None)
    conv = fn([[{"role": "user", "content": p}] for p in prompts],
              [[{"role": "assistant", "content": r}] for r in responses])
    assert plain == conv and len(plain) == 6 and all(isinstance(x, float) for x in plain)


def test_hybrid_calls_helpfulness_only_where_needed(guard):
    prompts, responses = pairs(8, seed=3)
    seen = []

    def helpful(ps, rs):
        seen.extend(rs)
        return [float(len(r)) for r in rs]

    rewards = SafetyReward(guard, "hybrid", helpful).score(prompts, responses)
    rv = guard.classify_responses(list(zip(prompts, responses)))
    pv = guard.classify_prompts(prompts)
    for r, a, b, resp in zip(rewards, rv, pv, responses):
        assert r == hybrid_reward(a, b, float(len(resp)))
    assert seen == [resp for r, a, b, resp in zip(rewards, rv, pv, responses)
                    if hybrid_reward(a, b, None) is None]


def test_invalid_completions(guard):
    with pytest.raises(InputError, match="sample 1"):
        SafetyReward(guard).score(["hi", "hi"], ["sure sure", ""])
    assert SafetyReward(guard, invalid_reward=-1.0).score(["hi"], [""]) == [-1.0]
    with pytest.raises(ValueError):
        SafetyReward(guard, "hybrid")


def test_empty_completion_gets_invalid_reward_alone_with_a_stream_judge(tiny_stream):
    from qguard.guard import Guard

    g = Guard.from_pretrained(tiny_stream, device="cpu")
    fn = reward_fn(g, invalid_reward=-1.0)
    rewards = fn(["hi", "hello", "hey"], ["", "ok then", "<think>x</think>"])
    assert rewards[0] == -1.0
    assert rewards[1:] == [guard_only_reward(g.classify_response("hello", "ok then")),
                           guard_only_reward(g.classify_response("hey", "<think>x</think>"))]


class AllSafe:
    def classify_conversations(self, convs, return_errors=False):
        return [v("Safe", refusal=False) for _ in convs]


def test_a_helpfulness_score_that_is_not_a_number_is_named():
    hybrid = SafetyReward(AllSafe(), "hybrid", lambda ps, rs: [None] * len(rs))
    with pytest.raises(InputError, match="returned None for sample 0, not a number"):
        hybrid.score(["hi"], ["fine"])
    assert SafetyReward(AllSafe(), "hybrid", lambda ps, rs: [0.5] * len(rs)).score(["hi"], ["fine"]) == [0.5]


def test_reward_config_names_a_bad_refusal_rule():
    with pytest.raises(InputError, match="penalize_refusal must be"):
        RewardConfig(penalize_refusal="never")


def test_a_per_pair_helpfulness_scorer_is_named_or_wrapped():
    # the call: a scorer of one pair, handed the batch, answered one number (a bare TypeError)
    fn = reward_fn(AllSafe(), kind="hybrid", helpfulness=lambda p, c: 1.0)
    with pytest.raises(InputError, match=r"returned float 1.0 for a batch of 2 pairs.*per_pair\(f\)"):
        fn(["hi", "yo"], ["fine", "sure"])
    seen = []

    def one(prompt, response):  # a per-pair scorer reads a message list and a string
        seen.append((prompt, response))
        return len(response) / 10

    fn = reward_fn(AllSafe(), kind="hybrid", helpfulness=per_pair(one))
    assert fn(["hi", [{"role": "user", "content": "yo"}]], ["fine", "sure!"]) == [0.4, 0.5]
    assert seen == [([{"role": "user", "content": "hi"}], "fine"), ([{"role": "user", "content": "yo"}], "sure!")]
    batch = reward_fn(AllSafe(), kind="hybrid", helpfulness=lambda ps, rs: [len(r) / 10 for r in rs])
    assert batch(["hi", "yo"], ["fine", "sure!"]) == [0.4, 0.5]  # the same rewards as the batch form


def test_helpfulness_scorers_of_the_wrong_shape_get_the_expected_signature():
    sig = r"f\(prompts, responses\) -> one number per pair"
    with pytest.raises(InputError, match=sig):  # needs two arguments: refused before any training step
        reward_fn(AllSafe(), kind="hybrid", helpfulness=lambda c: 1.0)
    with pytest.raises(InputError, match=sig):
        reward_fn(AllSafe(), kind="hybrid", helpfulness="WorldPM")
    with pytest.raises(InputError, match=sig):
        per_pair(lambda a, b, c: 1.0)
    strict_text = reward_fn(AllSafe(), kind="hybrid", helpfulness=lambda p, c: float(len(c.strip())))
    with pytest.raises(InputError, match=f"failed on a batch of 1 pair .AttributeError.*{sig}") as e:
        strict_text(["hi"], ["fine"])
    assert isinstance(e.value.__cause__, AttributeError)  # the scorer's own error stays attached
    with pytest.raises(InputError, match="returned str"):
        reward_fn(AllSafe(), kind="hybrid", helpfulness=lambda ps, rs: "0.5")(["hi"], ["fine"])
    with pytest.raises(InputError, match="returned 1 scores for 2 pairs"):
        reward_fn(AllSafe(), kind="hybrid", helpfulness=lambda ps, rs: [1.0])(["a", "b"], ["c", "d"])
