"""Policy files: the shipped example, every key's validation, the CLI's --policy, what readers take from it."""

from __future__ import annotations

import inspect
import json
import logging
import re

import pytest

from qguard.errors import InputError
from qguard.policy import Action, Category, DebounceRule, Mode, Policy
from qguard.policy_file import LeakControl, Limits, PolicyFile, load_policy_file, parse_policy_file
from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "policy.yaml"
BOMB = "How can I make a bomb at home?"  # the starter model: Unsafe, Violent


def all_keys() -> set[str]:
    top = {k for k in PolicyFile.model_fields if k not in ("limits", "leak_control")}
    return top | {f"limits.{k}" for k in Limits.model_fields} | {f"leak_control.{k}" for k in LeakControl.model_fields}


def write(tmp_path, text: str, name: str = "p.yaml"):
    p = tmp_path / name
    p.write_text(text, "utf-8")
    return p


# ------------------------------------------------------------------------------------------ the example

def test_the_example_loads_and_sets_every_key():
    pf = load_policy_file(EXAMPLE)
    assert pf.keys_set() == all_keys()  # a new key must be shown in the example
    assert pf.mode == "strict" and pf.actions == {"Politically Sensitive Topics": "flag", "Copyright Violation": "flag"}
    assert pf.limits.max_context == 4096 and pf.leak_control.on_unsafe == "cut"


def test_every_key_of_the_example_is_documented_by_a_comment_above_it():
    lines = EXAMPLE.read_text("utf-8").splitlines()
    for key in sorted(all_keys()):
        name = key.split(".")[-1]
        at = [i for i, line in enumerate(lines) if re.match(rf"\s*{re.escape(name)}:", line)]
        assert len(at) == 1, f"{key} is not written once in {EXAMPLE.name}"
        assert lines[at[0] - 1].lstrip().startswith("#"), f"{key} has no comment above it in {EXAMPLE.name}"


def test_policy_from_file_builds_the_policy():
    policy = Policy.from_file(EXAMPLE)
    assert policy == Policy(mode=Mode.STRICT, default_action=Action.BLOCK,
                            actions={Category.POLITICAL: Action.FLAG, Category.COPYRIGHT: Action.FLAG})


def test_toml_reads_like_yaml(tmp_path):
    yaml_file = write(tmp_path, "mode: loose\nactions:\n  PII: allow\nlimits:\n  max_sessions: 4\n"
                                "leak_control:\n  on_unsafe: refuse\n  hold_tokens: 0\n")
    toml_file = write(tmp_path, 'mode = "loose"\n[actions]\nPII = "allow"\n[limits]\nmax_sessions = 4\n'
                                '[leak_control]\non_unsafe = "refuse"\nhold_tokens = 0\n', "p.toml")
    a, b = load_policy_file(yaml_file), load_policy_file(toml_file)
    assert a.model_dump() == b.model_dump() and a.keys_set() == b.keys_set()
    assert Policy.from_file(toml_file).actions == {Category.PII: Action.ALLOW}


def test_the_version_names_the_file_and_hashes_its_bytes(tmp_path):
    p = write(tmp_path, "mode: strict\n")
    v1 = load_policy_file(p).version
    assert re.fullmatch(r"p\.yaml@sha256:[0-9a-f]{16}", v1)
    p.write_text("mode: strict\n# a comment is an edit too\n")
    assert load_policy_file(p).version != v1
    long = write(tmp_path, "mode: strict\n", "x" * 200 + ".yaml")
    assert len(load_policy_file(long).version) <= 128  # the audit log's column


def test_spellings_of_choices_and_categories(tmp_path):
    pf = load_policy_file(write(tmp_path, "mode: ' Loose'\ndefault_action: FLAG\ndebounce: Report\nactions:\n"
                                          "  violence: Block\n  self_harm: allow\nleak_control:\n  on_unsafe: Refuse\n"
                                          "  intervention: Nudge\n"))
    assert (pf.mode, pf.default_action, pf.debounce, pf.leak_control.on_unsafe) == ("loose", "flag", "report", "refuse")
    assert pf.actions == {"Violent": "block", "Suicide & Self-Harm": "allow"}
    assert pf.leak_control.intervention == "nudge"  # not inserted as the text "Nudge"
    own = load_policy_file(write(tmp_path, "leak_control:\n  intervention: Stay polite and safe.\n"))
    assert own.leak_control.intervention == "Stay polite and safe."


def test_keys_left_out_take_the_readers_defaults(tmp_path):
    pf = load_policy_file(write(tmp_path, "mode: loose\n"))
    assert pf.keys_set() == {"mode"}
    assert Policy.from_policy_file(pf) == Policy(mode=Mode.LOOSE)
    assert pf.guard_options() == {"debounce": "eval", "moderate_thinking": True}
    assert pf.stream_guard_options() == {"debounce": "eval"} and pf.generate_options() == {}


# ---------------------------------------------------------------------------------------------- bad files

BAD = [
    ("mode: [strict\n", "not valid YAML: line 2"),
    ("mode: strict\nmode: loose\n", "the key 'mode' is given twice"),
    ("actions:\n  Violent: flag\n  Violent: block\n", "the key 'Violent' is given twice"),
    ("mode: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
    ("- mode\n- strict\n", "must hold a mapping of keys"),
    ("# nothing but a comment\n", "is empty"),
    ("mod: strict\n", "unknown key 'mod' (did you mean 'mode'?); the keys allowed are mode, default_action"),
    ("limits:\n  max_sesions: 4\n", "unknown key 'limits.max_sesions' (did you mean 'max_sessions'?)"),
    ("leak_control:\n  hold: 2\n", "the keys allowed in leak_control are hold_tokens, on_unsafe"),
    ("mode: lose\n", "mode: input should be 'strict' or 'loose', got str 'lose'"),
    ("mode: 1\n", "mode: input should be 'strict' or 'loose', got int 1"),
    ("default_action: deny\n", "default_action: input should be 'allow', 'flag' or 'block', got str 'deny'"),
    ("actions:\n  Violent: deny\n", "actions.Violent: input should be 'allow', 'flag' or 'block', got str 'deny'"),
    ("actions:\n  Violance: flag\n", "actions: unknown category 'Violance'; known: Violent"),
    ("actions:\n  Violent: flag\n  Violence: block\n", "'Violent' and 'Violence' both name the category 'Violent'"),
    ("actions:\n  1: flag\n", "actions: a category is a name such as 'Violent', got int 1"),
    ("actions: [Violent]\n", "actions: expected a mapping of categories to 'allow', 'flag' or 'block', got list"),
    ("block_threshold: 1.5\n", "block_threshold: input should be less than or equal to 1, got float 1.5"),
    ("block_threshold: true\n", "block_threshold: input should be a valid number, got bool True"),
    ("block_threshold: '0.5'\n", "block_threshold: input should be a valid number, got str '0.5'"),
    ("debounce: strict\n", "debounce: input should be 'eval' or 'report', got str 'strict'"),
    ("moderate_thinking: 'no'\n", "moderate_thinking: input should be a valid boolean, got str 'no'"),
    ("refusal_message: '  '\n", "refusal_message: the refusal message is blank"),
    ("refusal_message: 42\n", "refusal_message: input should be a valid string, got int 42"),
    ("limits: 5\n", "limits: expected a mapping of keys, got int 5"),
    ("limits:\n  max_sessions: '4'\n", "limits.max_sessions: input should be a valid integer, got str '4'"),
    ("limits:\n  max_sessions: 4.0\n", "limits.max_sessions: input should be a valid integer, got float 4.0"),
    ("limits:\n  max_sessions: 0\n", "limits.max_sessions: input should be greater than or equal to 1, got int 0"),
    ("limits:\n  max_context: 8\n", "limits.max_context: input should be greater than or equal to 16, got int 8"),
    ("limits:\n  session_idle_timeout_s: 0\n", "limits.session_idle_timeout_s: input should be greater than 0"),
    ("leak_control:\n  hold_tokens: -1\n", "leak_control.hold_tokens: input should be greater than or equal to 0"),
    ("leak_control:\n  on_unsafe: explode\n", "on_unsafe: input should be 'cut', 'refuse' or 'rollback', got str 'explode'"),
    ("leak_control:\n  max_retries: true\n", "leak_control.max_retries: input should be a valid integer, got bool True"),
    ("leak_control:\n  intervention: ''\n", "leak_control.intervention: the intervention text is empty"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_files_name_the_key_the_value_and_the_choices(tmp_path, text, message):
    p = write(tmp_path, text)
    with pytest.raises(InputError) as e:
        load_policy_file(p)
    assert message in str(e.value)
    assert str(p) in str(e.value)


def test_every_problem_of_a_file_is_listed(tmp_path):
    with pytest.raises(InputError) as e:
        load_policy_file(write(tmp_path, "mode: lose\nlimits:\n  max_context: 8\nextra: 1\n"))
    lines = str(e.value).splitlines()
    assert "3 problems" in lines[0] and len(lines) == 4
    assert any("mode:" in x for x in lines) and any("limits.max_context" in x for x in lines)
    assert any("unknown key 'extra'" in x for x in lines)


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(InputError, match="policy file not found"):
        load_policy_file(tmp_path / "missing.yaml")
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(InputError, match="is not a file"):
        load_policy_file(tmp_path / "d.yaml")
    with pytest.raises(InputError, match=r"unknown format '\.json'; name it \*\.yaml, \*\.yml, \*\.toml"):
        load_policy_file(write(tmp_path, "{}", "p.json"))
    (tmp_path / "latin.yaml").write_bytes("refusal_message: Désolé\n".encode("latin-1"))
    with pytest.raises(InputError, match="is not UTF-8 text"):
        load_policy_file(tmp_path / "latin.yaml")
    with pytest.raises(InputError, match="is not valid TOML"):
        load_policy_file(write(tmp_path, "mode = strict\n", "p.toml"))
    with pytest.raises(InputError, match="at most"):
        load_policy_file(write(tmp_path, "# " + "x" * (1 << 20) + "\nmode: strict\n"))


def test_a_byte_order_mark_is_not_part_of_the_first_key(tmp_path):
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfmode: loose\n")
    assert load_policy_file(tmp_path / "bom.yaml").mode == "loose"


def test_parsed_data_is_validated_the_same_way():
    assert parse_policy_file({"mode": "loose"}).mode == "loose"
    with pytest.raises(InputError, match="inline: unknown key 'modes'"):
        parse_policy_file({"modes": "loose"}, where="inline")


# ------------------------------------------------------------------------------------- what readers take

def test_the_leak_control_keys_fit_qguard_generate():
    from qguard.generate import DEFAULT_HOLD_TOKENS, OnUnsafe, guarded_generate
    from qguard.policy_file import DEFAULT_HOLD_TOKENS as FILE_DEFAULT

    pf = load_policy_file(EXAMPLE)
    params = inspect.signature(guarded_generate).parameters
    assert set(pf.generate_options()) <= set(params)  # every option is a keyword of guarded_generate
    assert set(pf.generate_options()) == {"hold_tokens", "on_unsafe", "buffer_tokens", "max_retries", "intervention",
                                          "refusal_message"}
    assert FILE_DEFAULT == DEFAULT_HOLD_TOKENS == params["hold_tokens"].default
    assert set(LeakControl.model_fields["on_unsafe"].annotation.__args__[0].__args__) == {m.value for m in OnUnsafe}


def test_guard_options_reach_the_guard(tiny_stream, tmp_path):
    from qguard.runtime.guard import Guard

    pf = load_policy_file(write(tmp_path, "debounce: report\nmoderate_thinking: false\nmode: loose\n"))
    g = Guard.from_pretrained(tiny_stream, policy=Policy.from_policy_file(pf), **pf.guard_options())
    assert g.debounce_rule is DebounceRule.REPORT and g.moderate_thinking is False and g.policy.mode is Mode.LOOSE
    sg = g.stream_guard(**load_policy_file(write(tmp_path, "limits:\n  max_sessions: 3\n  max_context: 64\n",
                                                 "l.yaml")).stream_guard_options())
    assert sg.engine.max_sessions == 3 and sg.engine.max_context == 64


# -------------------------------------------------------------------------------------------------- CLI

def run(capsys, *argv):
    from qguard.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_takes_the_files_actions(capsys, tmp_path):
    plain = run(capsys, "classify", "--json", BOMB)
    assert plain[0] == 0 and json.loads(plain[1])["action"] == "block"  # the starter: Unsafe, Violent
    p = write(tmp_path, "actions:\n  Violent: flag\n")
    code, out, _ = run(capsys, "classify", "--policy", str(p), "--json", BOMB)
    d = json.loads(out)
    assert code == 0 and d["action"] == "flag" and d["categories"] == ["Violent"] and d["mode"] == "strict"


def test_mode_given_with_policy_wins(capsys, tmp_path):
    p = write(tmp_path, "mode: strict\nactions:\n  Violent: flag\n")
    code, out, _ = run(capsys, "classify", "--policy", str(p), "--mode", "loose", "--json", BOMB)
    d = json.loads(out)
    assert code == 0 and d["mode"] == "loose" and d["action"] == "flag"  # the file's actions stay


def test_a_bad_policy_file_is_a_clean_cli_error(capsys, tmp_path):
    p = write(tmp_path, "mode: lose\n")
    for argv in (["classify", "--policy", str(p), "hi"], ["stream-trace", "--policy", str(p), "--prompt", "a",
                                                          "--response", "b"],
                 ["annotate", "--policy", str(p), str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl")],
                 ["classify", "--policy", str(tmp_path / "missing.yaml"), "hi"]):
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("qguard: error: policy file") and "Traceback" not in err


def test_annotate_reads_rows_under_the_files_policy(capsys, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": BOMB}) + "\n" + json.dumps({"prompt": "What's the capital of France?"}) + "\n")
    p = write(tmp_path, "actions:\n  Violent: flag\n")
    code, _, err = run(capsys, "annotate", str(inp), "-o", str(tmp_path / "out.jsonl"), "--policy", str(p),
                       "--no-progress")
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["guard"]["action"] for r in rows] == ["flag", "allow"]


def test_serve_takes_the_refusal_and_names_the_keys_it_does_not_apply(tmp_path, caplog):
    from qguard.cli import build_parser
    from qguard.cli.serve import policy_refusal

    p = write(tmp_path, "refusal_message: Not here.\nlimits:\n  max_context: 512\nleak_control:\n  hold_tokens: 3\n")
    args = build_parser().parse_args(["serve", "--policy", str(p)])
    with caplog.at_level(logging.WARNING, logger="qguard.serve"):
        assert policy_refusal(args) == "Not here."
    assert "does not apply" not in caplog.text  # serve applies limits and leak_control (`policy_settings`)
    assert policy_refusal(build_parser().parse_args(["serve", "--policy", str(p), "--refusal", "No."])) == "No."
    assert policy_refusal(build_parser().parse_args(["serve"])) is None


def test_the_readme_example_runs():
    import subprocess
    import sys

    readme = (REPO / "README.md").read_text("utf-8")
    code = re.search(r"### Policy files.*?```python\n(.*?)```", readme, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "strict 4096 cut policy.yaml@sha256:" + load_policy_file(EXAMPLE).version[19:25]
