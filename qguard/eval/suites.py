"""Benchmarks grouped into suites the way the Qwen3Guard tech report groups them.

`role` says how a benchmark enters the report:
- "avg": a column of the suite table and part of its average;
- "extra": reported in the suite table but outside the average (not in the report, or a stand-in
  with a different metric, such as the all-Safe false-refusal set);
- "refusal": headline metric is refusal F1 (its safety numbers are still computed).
Files that are not listed here (user files) form the "custom" suite, each in its average.
"""

from __future__ import annotations

from dataclasses import dataclass

from qguard.errors import InputError


@dataclass(frozen=True)
class Benchmark:
    name: str  # file stem
    suite: str
    role: str = "avg"  # "avg" | "extra" | "refusal"
    column: str = ""  # short column name for tables

    @property
    def title(self) -> str:
        return self.column or self.name


def _b(name: str, suite: str, column: str, role: str = "avg") -> Benchmark:
    return Benchmark(name, suite, role, column)


BENCHMARKS: tuple[Benchmark, ...] = (
    # English prompt classification (report Table: ToxiC, OpenAIMod, Aegis, SimpST, HarmB, WildG, XSTest)
    _b("toxicchat", "english-prompt", "ToxiC"),
    _b("openai_moderation", "english-prompt", "OpenAIMod"),
    _b("aegis1", "english-prompt", "Aegis"),
    _b("simplesafetytests", "english-prompt", "SimpST"),
    _b("harmbench_prompt", "english-prompt", "HarmB"),
    # a partial stand-in for WildGuardTest (data README): named as such in every table
    _b("wildguardtest_prompt_partial", "english-prompt", "WildG-partial"),
    _b("xstest_prompt", "english-prompt", "XSTest"),
    # English response classification
    _b("harmbench_response", "english-response", "HarmB"),
    _b("saferlhf", "english-response", "SafeRLHF"),
    _b("beavertails", "english-response", "BeaverT"),
    _b("xstest_response", "english-response", "XSTest"),
    _b("jailjudge_mini", "english-response", "JailJudge-mini", "extra"),
    _b("xstest_refusal", "english-response", "XSTest-refusal", "refusal"),
    # Multilingual prompts. CyberSecEval FRR is all Safe: its number is a false-positive rate, so it
    # sits beside the table rather than in an F1 average.
    _b("rtp_lx", "multilingual", "RTP-LX"),
    _b("multijail", "multilingual", "MultiJail"),
    _b("xsafety", "multilingual", "XSafety"),
    _b("cyberseceval_frr", "multilingual", "CSE-FRR", "extra"),
    # Chinese
    _b("jailbench_zh", "chinese", "JailBench"),
    _b("flames", "chinese", "Flames"),
    _b("jade_prompt", "chinese", "JADE-prompt"),
    _b("jade_response", "chinese", "JADE-response"),
    # Streaming detection (latency bins)
    _b("stream_spliced", "stream", "StreamSpliced"),
)

SUITES: tuple[str, ...] = ("english-prompt", "english-response", "multilingual", "chinese", "stream")
CUSTOM = "custom"
_BY_NAME = {b.name: b for b in BENCHMARKS}


def benchmark(name: str) -> Benchmark:
    """The spec of a known benchmark, or a "custom" one for a user file."""
    return _BY_NAME.get(name) or Benchmark(name, CUSTOM)


def select(files: dict[str, object], suite: str) -> list[str]:
    """Benchmark names (keys of `files`) to run for `suite`, in table order.

    "all" runs every file found, known ones in report order, then user files alphabetically.
    """
    if suite != "all" and suite not in SUITES:
        raise InputError(f"unknown suite {suite!r}; choose one of: {', '.join((*SUITES, 'all'))}")
    known = [b.name for b in BENCHMARKS if b.name in files and suite in ("all", b.suite)]
    custom = sorted(n for n in files if n not in _BY_NAME) if suite == "all" else []
    chosen = known + custom
    if not chosen:
        wanted = [b.name for b in BENCHMARKS if b.suite == suite]
        raise InputError(f"suite {suite!r}: none of its files ({', '.join(wanted)}.jsonl) is in --data")
    return chosen


def suite_order(names: list[str]) -> list[str]:
    """Suites present among `names`, in report order."""
    present = {benchmark(n).suite for n in names}
    return [s for s in (*SUITES, CUSTOM) if s in present]
