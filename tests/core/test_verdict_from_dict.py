"""`Verdict.from_dict` / `TokenVerdict.from_dict`: what a client rebuilds from a server's JSON is the same object."""

from __future__ import annotations

import json

import pytest

from qguard.errors import InputError
from qguard.policy import Action, Category, Mode, Part, Policy, Severity, TokenVerdict, Verdict


def test_verdict_round_trips_through_json():
    v = Policy(mode=Mode.LOOSE, actions={"Violent": Action.FLAG}).verdict(
        Severity.UNSAFE, [Category.VIOLENT], probs={"Safe": 0.1, "Unsafe": 0.8, "Controversial": 0.1},
        category_probs={"Violent": 0.9}, unsafe_position=3, n_tokens=12)
    assert Verdict.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    err = Policy().error_verdict("unparsable", raw_output="???")
    assert Verdict.from_dict(err.to_dict()) == err


def test_token_verdict_round_trips_through_json():
    tv = TokenVerdict(token_id=7, index=0, position=30, part=Part.ANSWER, probs={"Safe": 0.9, "Unsafe": 0.1},
                      category_probs={"Violent": 0.2}, label=Severity.SAFE, category=Category.VIOLENT,
                      response_label=Severity.SAFE, unsafe_position=None, stop=False, text="Hi")
    assert TokenVerdict.from_dict(json.loads(json.dumps(tv.to_dict()))) == tv


@pytest.mark.parametrize("bad", [{}, {"label": "Maybe"}, {"label": "Safe", "categories": ["Nope"]}, [], "Safe"])
def test_not_a_verdict_is_an_input_error(bad):
    with pytest.raises(InputError):
        Verdict.from_dict(bad)
    with pytest.raises(InputError):
        TokenVerdict.from_dict(bad)
