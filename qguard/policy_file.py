"""Policy files: one YAML or TOML file with what a deployment configures, validated before anything runs.

    pf = load_policy_file("examples/policy.yaml")     # a PolicyFile, or InputError naming the bad key
    policy = Policy.from_file("examples/policy.yaml")  # qguard.policy: just the Policy (mode, actions, ...)
    pf.version                                         # "policy.yaml@sha256:3f1c...": for audit logs

Every key is optional; a key left out means the default of whatever reads it. Unknown keys, wrong types and
values outside their choices are errors that name the key, the value and what is allowed. Which keys are
used where:

| key | read by |
|---|---|
| mode, default_action, actions, block_threshold | `Policy.from_file` / `Policy.from_policy_file`: every guard, `--policy` on every CLI command with `--mode`, the LiteLLM guardrail |
| debounce, moderate_thinking | `guard_options()`: `Guard.from_pretrained`, the CLI, the LiteLLM guardrail (debounce) |
| refusal_message | `qguard serve` (`--refusal` wins), the LiteLLM guardrail (`on_unsafe: refuse`), `generate_options()` |
| limits.* | `qguard serve` (`policy_settings` in qguard/cli/serve.py: options given win); max_sessions and max_context also `stream_guard_options()`: the LiteLLM guardrail's StreamGuard |
| leak_control.* | `qguard serve` (the proxy's hold-back and on_unsafe), `generate_options()` (`qguard.generate`); hold_tokens and on_unsafe (cut / refuse) also the LiteLLM guardrail's streaming hook |

This module reads and checks the file; it knows no Policy object (qguard.policy builds one from it), so
the policy module can use it without a cycle.
"""

from __future__ import annotations

import difflib
import hashlib
import sys
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from qguard.errors import InputError, LabelError
from qguard.taxonomy import parse_category

__all__ = ["DEFAULT_HOLD_TOKENS", "FORMATS", "LeakControl", "Limits", "PolicyFile", "load_policy_file",
           "parse_policy_file"]

FORMATS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}
MAX_FILE_BYTES = 1 << 20  # a policy file is a page of settings; anything near this is the wrong file
# qguard.generate.DEFAULT_HOLD_TOKENS (tested equal): the debounce decides at the second of two unsafe
# tokens, so holding two keeps both of them from the client
DEFAULT_HOLD_TOKENS = 2
_INTERVENTIONS = ("nudge", "introspect")
_ACTIONS = ("allow", "flag", "block")
_VERSION_MAX = 128  # the audit log's policy_version column


def _choice(value: Any, allowed: tuple[str, ...]) -> Any:
    """A choice spelt in any case, with surrounding spaces (as `Mode("Strict ")` accepts it), as its name;
    anything else stays as written, for the error to quote."""
    if isinstance(value, str) and value.strip().lower() in allowed:
        return value.strip().lower()
    return value


def _choices(*allowed: str):
    return lambda value: _choice(value, allowed)


class _Section(BaseModel):
    # strict: YAML's "5" is not 5, true is not 1; a float field takes an int
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Limits(_Section):
    """Resource limits of a deployment; None: the reader's own default."""

    max_sessions: int | None = Field(None, ge=1, description="live Stream sessions at once")
    max_context: int | None = Field(None, ge=16, description="tokens per live-moderated conversation")
    max_request_bytes: int | None = Field(None, ge=1, description="larger HTTP request bodies are refused")
    session_idle_timeout_s: float | None = Field(None, gt=0, description="a streaming session idle this long is closed")


class LeakControl(_Section):
    """What reaches a client of a stream the guard blocks (issue 17); None: the reader's own default."""

    hold_tokens: int | None = Field(None, ge=0, description="text released only this many judged tokens behind")
    on_unsafe: Literal["cut", "refuse", "rollback"] | None = None
    buffer_tokens: int | None = Field(None, ge=0, description="rollback's hold-back")
    max_retries: int | None = Field(None, ge=0, description="rollbacks before refusing")
    intervention: str | None = Field(None, min_length=1, description="'nudge', 'introspect' or the text to insert")

    _norm_on_unsafe = field_validator("on_unsafe", mode="before")(_choices("cut", "refuse", "rollback"))

    @field_validator("intervention", mode="before")
    @classmethod
    def _intervention(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("the intervention text is empty; use 'nudge', 'introspect' or the text to insert")
        return _choice(value, _INTERVENTIONS)  # "Nudge" would otherwise be inserted as the text "Nudge"


class PolicyFile(_Section):
    """A validated policy file: every key it may hold (see the module doc), with its defaults.

    `path` and `version` say where it came from (they are not keys of the file)."""

    mode: Literal["strict", "loose"] = "strict"
    default_action: Literal["allow", "flag", "block"] = "block"
    actions: dict[str, Literal["allow", "flag", "block"]] = Field(default_factory=dict)
    block_threshold: float | None = Field(None, ge=0.0, le=1.0)
    debounce: Literal["eval", "report"] = "eval"
    moderate_thinking: bool = True
    refusal_message: str | None = Field(None, min_length=1)
    limits: Limits = Field(default_factory=Limits)
    leak_control: LeakControl = Field(default_factory=LeakControl)

    _path: str | None = PrivateAttr(None)
    _version: str | None = PrivateAttr(None)

    _norm_mode = field_validator("mode", mode="before")(_choices("strict", "loose"))
    _norm_default = field_validator("default_action", mode="before")(_choices(*_ACTIONS))
    _norm_debounce = field_validator("debounce", mode="before")(_choices("eval", "report"))

    @field_validator("actions", mode="before")
    @classmethod
    def _actions(cls, value: Any) -> Any:
        """Category keys in any accepted spelling ("Violence", "self_harm") -> the taxonomy's names."""
        if not isinstance(value, Mapping):
            return value  # the type error names the key
        out: dict[Any, Any] = {}
        spelt: dict[str, Any] = {}
        for key, action in value.items():
            if not isinstance(key, str):
                raise ValueError(f"a category is a name such as 'Violent', got {type(key).__name__} {key!r}")
            try:
                name = parse_category(key).value
            except LabelError as e:
                raise ValueError(str(e)) from None
            if name in out:
                raise ValueError(f"{spelt[name]!r} and {key!r} both name the category {name!r}; give it once")
            out[name], spelt[name] = _choice(action, _ACTIONS), key
        return out

    @field_validator("refusal_message")
    @classmethod
    def _refusal(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("the refusal message is blank")
        return value

    @property
    def path(self) -> str | None:
        """The file it was read from (None: built from data)."""
        return self._path

    @property
    def version(self) -> str:
        """`<file name>@sha256:<16 hex>` of the file's bytes: what an audit log records as the policy in
        force (any edit, a comment included, is a new version). At most 128 characters."""
        return self._version or "inline@sha256:" + _digest(self.model_dump_json().encode("utf-8"))

    def keys_set(self) -> set[str]:
        """The keys the file gives, dotted for sections (`limits.max_context`): what a reader with its own
        defaults or flags must apply or say it ignores."""
        out = {k for k in self.model_fields_set if k not in ("limits", "leak_control")}
        for section in ("limits", "leak_control"):
            out |= {f"{section}.{k}" for k in getattr(self, section).model_fields_set}
        return out

    def guard_options(self) -> dict[str, Any]:
        """Keyword options of `Guard.from_pretrained` besides the policy: debounce, moderate_thinking."""
        return {"debounce": self.debounce, "moderate_thinking": self.moderate_thinking}

    def stream_guard_options(self) -> dict[str, Any]:
        """Keyword options of a `StreamGuard` that the file sets (max_sessions, max_context, debounce)."""
        lim = self.limits
        return {"debounce": self.debounce,
                **{k: getattr(lim, k) for k in ("max_sessions", "max_context") if getattr(lim, k) is not None}}

    def generate_options(self) -> dict[str, Any]:
        """Keyword options of `qguard.generate.guarded_generate` that the file sets (hold_tokens, on_unsafe,
        buffer_tokens, max_retries, intervention, refusal_message)."""
        lc = self.leak_control
        out = {k: v for k, v in lc.model_dump().items() if v is not None}
        if self.refusal_message is not None:
            out["refusal_message"] = self.refusal_message
        return out


# --------------------------------------------------------------------------------------------- reading

def load_policy_file(path: str | Path) -> PolicyFile:
    """Read and validate a policy file (.yaml, .yml or .toml); InputError naming what is wrong."""
    p = Path(path)
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise InputError(f"policy file {p}: unknown format {p.suffix or '(no extension)'!r}; name it "
                         f"{', '.join(f'*{s}' for s in FORMATS)}")
    if not p.exists():
        raise InputError(f"policy file not found: {p}")
    if not p.is_file():
        raise InputError(f"policy file {p} is not a file")
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InputError(f"policy file {p} is {size} bytes; a policy file is at most {MAX_FILE_BYTES} bytes")
        raw = p.read_bytes()
    except OSError as e:
        raise InputError(f"policy file {p} cannot be read ({e.strerror})") from None
    pf = parse_policy_file(raw, fmt, where=str(p))
    pf._path = str(p)
    pf._version = f"{p.name[:_VERSION_MAX - 24]}@sha256:{_digest(raw)}"
    return pf


def parse_policy_file(data: bytes | str | Mapping[str, Any], fmt: Literal["yaml", "toml"] = "yaml", *,
                      where: str = "policy") -> PolicyFile:
    """A policy from the text of a file (`fmt`: yaml or toml) or from data already parsed (a mapping);
    `where` names it in errors."""
    if isinstance(data, Mapping):
        doc: Any = data
    else:
        text = data
        if isinstance(data, bytes):
            try:
                text = data.decode("utf-8-sig")  # an editor's BOM is not part of the settings
            except UnicodeDecodeError:
                raise InputError(f"policy file {where} is not UTF-8 text") from None
        doc = _parse_toml(text, where) if fmt == "toml" else _parse_yaml(text, where)
    if doc is None:
        raise InputError(f"policy file {where} is empty: write keys such as `mode: strict` (see examples/policy.yaml)")
    if not isinstance(doc, Mapping):
        raise InputError(f"policy file {where} must hold a mapping of keys (mode, actions, ...), not a "
                         f"{type(doc).__name__}")
    try:
        return PolicyFile.model_validate(dict(doc))
    except ValidationError as e:
        problems = [_problem(err) for err in e.errors()]
        if len(problems) == 1:
            raise InputError(f"policy file {where}: {problems[0]}") from None
        raise InputError(f"policy file {where}: {len(problems)} problems:\n" +
                         "\n".join(f"  - {p}" for p in problems)) from None


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a safe loader: no Python objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = "; ".join(x for x in (e.problem, e.context) if x)
        raise InputError(f"policy file {where} is not valid YAML: {at}{what}") from None
    except yaml.YAMLError as e:
        raise InputError(f"policy file {where} is not valid YAML: {' '.join(str(e).split())}") from None


def _parse_toml(text: str, where: str) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the tomli backport (a dependency on 3.10)
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"policy file {where} is not valid TOML: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; in a policy that would silently drop a setting."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            continue  # construct_mapping names it (an unhashable key)
        if key in seen:
            raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                    f"the key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- errors

_SECTIONS: dict[str, type[BaseModel]] = {"limits": Limits, "leak_control": LeakControl}


def _problem(err: dict[str, Any]) -> str:
    """One pydantic error as a sentence naming the key, the value and what is allowed."""
    loc = [str(x) for x in err["loc"]]
    key = ".".join(loc) or "(top level)"
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        model = _SECTIONS.get(loc[0]) if len(loc) > 1 else PolicyFile
        allowed = list(model.model_fields) if model is not None else []
        near = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        inside = f" in {'.'.join(loc[:-1])}" if len(loc) > 1 else ""
        return f"unknown key {key!r}{hint}; the keys allowed{inside} are {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    if kind in ("model_type", "dict_type"):
        what = "categories to 'allow', 'flag' or 'block'" if key == "actions" else "keys"
        return f"{key}: expected a mapping of {what}, got {type(value).__name__} {value!r}"
    if kind == "value_error":
        return f"{key}: {msg}"
    return f"{key}: {msg[0].lower() + msg[1:]}, got {type(value).__name__} {value!r}"
