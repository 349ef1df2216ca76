"""`qguard serve --policy FILE`: the file's policy, limits, leak control and version reach the server."""

from __future__ import annotations

import pytest

from qguard.cli import main


@pytest.fixture()
def captured(monkeypatch, tiny_stream):
    """Run `qguard serve` up to uvicorn, keeping the app it would serve (the tiny model, no port bound)."""
    import uvicorn

    import qguard.cli.serve as serve_cli
    from qguard.cli import cli_policy
    from qguard.runtime.guard import Guard
    from qguard.serve import ops

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("app", app))
    monkeypatch.setattr(serve_cli, "load_guard", lambda args: Guard.from_pretrained(tiny_stream,
                                                                                    policy=cli_policy(args)))
    monkeypatch.setattr(ops, "configure_logging", lambda *a: None)
    return seen


POLICY = """\
mode: loose
default_action: flag
actions: {Violent: block}
refusal_message: "Not here."
limits: {max_sessions: 3, max_context: 256, max_request_bytes: 65536, session_idle_timeout_s: 5}
leak_control: {hold_tokens: 4, on_unsafe: cut}
"""


def test_serve_settings_follow_the_policy_file(tmp_path, captured):
    f = tmp_path / "deploy.yaml"
    f.write_text(POLICY)
    assert main(["serve", "--policy", str(f)]) == 0
    app = captured["app"]
    s = app.state.settings
    assert (s.max_concurrency, s.max_context, s.max_request_bytes, s.stream_idle_timeout_s) == (3, 256, 65536, 5)
    assert (s.hold_tokens, s.on_unsafe, s.refusal_message) == (4, "cut", "Not here.")
    assert s.policy_version.startswith("deploy.yaml@sha256:")
    policy = app.state.guard.policy
    assert policy.mode.value == "loose" and policy.default_action.value == "flag"


def test_command_line_options_win_over_the_file(tmp_path, captured):
    f = tmp_path / "deploy.yaml"
    f.write_text(POLICY)
    assert main(["serve", "--policy", str(f), "--max-context", "512", "--hold-tokens", "0",
                 "--refusal", "No."]) == 0
    s = captured["app"].state.settings
    assert (s.max_context, s.hold_tokens, s.refusal_message, s.max_concurrency) == (512, 0, "No.", 3)


def test_a_bad_policy_file_is_a_clear_error(tmp_path, captured, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("limits: {max_sesions: 3}\n")
    assert main(["serve", "--policy", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qguard: error:") and "max_sesions" in err and "max_sessions" in err
    assert "app" not in captured
