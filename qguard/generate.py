"""Guarded generation with a local transformers LLM: detect, roll back, intervene (CARE).

    from qguard.generate import guarded_generate
    r = guarded_generate(llm, llm_tokenizer, stream_guard, [{"role": "user", "content": "..."}],
                         max_new_tokens=256, on_release=print)
    r.text, r.verdict, r.retries, r.wait_tokens

The loop of CARE (Hu et al. 2025, arXiv:2509.06982) as the Qwen3Guard tech report (section 4.5) runs it
with Qwen3Guard-Stream: the LLM generates token by token with its own KV cache and every token goes to a
live `StreamSession` at once (token ids when the LLM shares Qwen3's vocabulary, else decoded text deltas
through `push_text`). Text is released to the caller only when it is `buffer_tokens` (rollback) or
`hold_tokens` (cut, refuse) guard tokens behind the newest judged token, and the rest once the finished
answer is judged. On a blocking verdict (`TokenVerdict.stop`):

- `rollback`: the unreleased buffer is discarded; the LLM's ids and KV cache are cut back to the last
  released point (`Cache.crop`), an intervention is inserted as tokens into the LLM's context (a fixed
  safety nudge, the LLM's own short critique of the discarded text, or an operator's text) and
  generation goes on; after `max_retries` rollbacks the refusal message is released instead.
- `cut`: generation stops; only the released text (nothing at or after the unsafe position) stays.
- `refuse`: like cut, then the refusal message is released.

What the guard reads is the released answer only: interventions and critiques go into the LLM's context,
never into a guard session, never to the caller. So the guard's final verdict is the verdict of exactly
the text the caller received (the same as one full forward over it).

Restoring the guard at the rollback point without re-judging the prefix: a second session, the
checkpoint, follows the release point (it is pushed the released tokens, in the same batched step as the
live session's next token when ids are pushed, in chunks of `_CHECKPOINT_CHUNK` tokens for text); on a
rollback the live session is closed and the checkpoint is forked (one KV copy of the released prefix,
no forward). Cost: two sessions per generation, one more row in each engine step (ids) or one
prefill step per chunk (text), one KV copy per rollback. A fork of the live session cannot serve: it is
already `buffer_tokens` past the release point, and sessions cannot be truncated.
"""

from __future__ import annotations

import bisect
import inspect
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from qguard.errors import CapacityError, InputError, check_int, check_number
from qguard.leak import DEFAULT_HOLD_TOKENS, INTROSPECTION_INSERT, INTROSPECTION_PROMPT, NUDGE, OnUnsafe
from qguard.leak import Intervention as _Intervention
from qguard.policy import TokenVerdict, Verdict
from qguard.runtime.stream import StreamGuard, StreamSession
from qguard.tokenizer import ENDOFTEXT, IM_END, Message, chat_ids, check_turn, encode_text

__all__ = [
    "DEFAULT_HOLD_TOKENS", "DEFAULT_REFUSAL", "INTROSPECTION_PROMPT", "NUDGE", "GuardedGeneration",
    "GuardedStream", "OnUnsafe", "Rollback", "guarded_generate", "guarded_stream",
]

DEFAULT_REFUSAL = "Sorry, I can't help with that."

_CHECKPOINT_CHUNK = 8  # text pushes: released tokens the checkpoint session may lag by (one step each)


@dataclass(frozen=True)
class Rollback:
    """One rollback: where the answer was cut back to and what it cost."""

    at: int  # LLM answer tokens kept (all of them released): the rollback point
    discarded: int  # LLM answer tokens thrown away (the unreleased buffer)
    unsafe_position: int | None  # guard token index in the discarded branch where the verdict turned unsafe
    intervention_tokens: int  # tokens inserted into the LLM's context (the critique's included)
    critique_tokens: int  # tokens the LLM generated for its critique (introspect), never released


@dataclass(frozen=True)
class GuardedGeneration:
    """The outcome of a guarded generation: what the caller received and what it took."""

    text: str  # the released text (the refusal message included when one was released)
    ids: list[int]  # its LLM token ids (kept answer tokens, then the refusal's)
    verdict: Verdict  # the guard's response verdict of exactly the released text
    prompt: Verdict  # the guard's prompt verdict
    token_verdicts: list[TokenVerdict]  # the guard's per-token verdicts over the released text
    finish_reason: str  # "stop" (end of answer), "length" (max_new_tokens), "content_filter" (cut), "refused"
    refused: bool
    retries: int  # rollbacks done
    rolled_back_tokens: int  # LLM answer tokens generated and discarded
    generated_tokens: int  # tokens the LLM sampled: answer tokens (kept or not) and critique tokens
    wait_tokens: int  # generated_tokens beyond the released LLM tokens: what the caller waited for
    rollbacks: tuple[Rollback, ...]
    pushed_ids: bool  # the guard was pushed the LLM's ids (shared vocabulary), else its text


class GuardedStream:
    """A guarded generation in progress: iterate for the released text chunks; `result` once done.

    Dropping the iteration early (or `close()`) ends the generation and frees its guard sessions."""

    def __init__(self, run: _Run):
        self._run = run
        self._chunks = run.chunks()

    def __iter__(self) -> Iterator[str]:
        return self._chunks

    @property
    def result(self) -> GuardedGeneration | None:
        """The outcome, once the iteration has ended (None before, and after an early close)."""
        return self._run.result

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> GuardedStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def guarded_generate(llm: torch.nn.Module, llm_tokenizer, stream_guard: StreamGuard,
                     messages: str | Sequence[Message], *, on_release: Callable[[str], object] | None = None,
                     max_new_tokens: int = 256, on_unsafe: OnUnsafe | str = OnUnsafe.ROLLBACK,
                     hold_tokens: int = DEFAULT_HOLD_TOKENS, buffer_tokens: int = 40, max_retries: int = 5,
                     intervention: str = "introspect", critique_tokens: int = 48,
                     refusal_message: str = DEFAULT_REFUSAL, do_sample: bool = False, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None, logits_processor=None,
                     stop_token_ids: Sequence[int] | None = None, push_ids: bool | None = None) -> GuardedGeneration:
    """Generate an answer to `messages` (ending with the user's turn) with `llm`, a transformers causal LM,
    under the live guard `stream_guard`; see the module doc.

    - `on_release(text)`: called with each chunk of text as it is released.
    - `max_new_tokens`: the most LLM tokens of the answer (the released one; across rollbacks the LLM may
      generate up to `max_retries + 1` times as many, critiques apart).
    - `on_unsafe`: "rollback", "cut" or "refuse". `hold_tokens`: the cut/refuse hold-back, in guard tokens
      (0: stream-first). `buffer_tokens`: the rollback hold-back. `max_retries`: rollbacks before refusing.
    - `intervention`: "introspect" (the LLM's own critique of the discarded text, at most `critique_tokens`
      tokens), "nudge" (`NUDGE`), or the text to insert. `refusal_message`: what refusing releases.
    - Sampling: greedy unless `do_sample`; `temperature`, `top_k`, `top_p`, `seed`; `logits_processor`: a
      list of transformers logits processors applied to the answer tokens (they see the LLM's context).
    - `stop_token_ids`: ids that end the answer besides the LLM's eos ids. `push_ids`: push the LLM's token
      ids to the guard (None: when the two tokenizers have the same vocabulary), else its text.
    """
    run = _Run(llm, llm_tokenizer, stream_guard, messages, max_new_tokens=max_new_tokens, on_unsafe=on_unsafe,
               hold_tokens=hold_tokens, buffer_tokens=buffer_tokens, max_retries=max_retries,
               intervention=intervention, critique_tokens=critique_tokens, refusal_message=refusal_message,
               do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
               logits_processor=logits_processor, stop_token_ids=stop_token_ids, push_ids=push_ids)
    for chunk in run.chunks():
        if on_release is not None:
            on_release(chunk)
    assert run.result is not None
    return run.result


def guarded_stream(llm: torch.nn.Module, llm_tokenizer, stream_guard: StreamGuard,
                   messages: str | Sequence[Message], **options) -> GuardedStream:
    """`guarded_generate` (the same keyword options, but `on_release`) as an iterator of the released text
    chunks; the options are checked at once, generation starts with the iteration."""
    return GuardedStream(_Run(llm, llm_tokenizer, stream_guard, messages, **options))


@lru_cache(maxsize=8)
def _same_vocab(a, b) -> bool:
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


class _Text:
    """Incremental detokenization of the answer (the prefix/read offsets of vLLM's detokenizer: a token
    whose bytes end inside a character shows no text until the character is complete). `ends[k]`: the
    text length once token k's text is out, None before; tokens that came out together share it."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.ends: list[int | None] = []
        self.text = ""
        self.prefix = self.read = 0
        self._states: list[tuple[int, int, int]] = []  # (prefix, read, len(text)) after each token

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        self.ends.append(None)
        delta = self._advance(final=False)
        self._states.append((self.prefix, self.read, len(self.text)))
        return delta

    def finish(self) -> str:
        """The text still held (an incomplete character at the end shows as U+FFFD)."""
        delta = self._advance(final=True)
        for k in range(self.read, len(self.ids)):
            self.ends[k] = len(self.text)
        self.prefix = self.read = len(self.ids)
        return delta

    def _advance(self, final: bool) -> str:
        decode = self.tok.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        delta = now[len(before):]
        self.text += delta
        for k in range(self.read, len(self.ids)):
            self.ends[k] = len(self.text)
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def boundary(self, n: int) -> bool:
        """Whether the first n tokens' text is out and ends there (a place text can be cut)."""
        return n == 0 or (n <= self.read and (n == len(self.ids) or self.ends[n] != self.ends[n - 1]))

    def tokens_within(self, chars: int) -> int:
        """How many leading tokens have all their text in text[:chars]."""
        return bisect.bisect_right(self.ends, chars, hi=self.read)  # ends[:read] are set, in order

    def end_of(self, n: int) -> int:
        return 0 if n == 0 else self.ends[n - 1]  # type: ignore[return-value]

    def truncate(self, n: int) -> None:
        """Back to the state after the first n tokens (n must be a `boundary`)."""
        del self.ids[n:], self.ends[n:], self._states[n:]
        self.prefix, self.read, length = self._states[n - 1] if n else (0, 0, 0)
        self.read = n  # every kept token's text is out
        self.text = self.text[:length]


def _check_messages(messages) -> list[Message]:
    msgs = check_turn([{"role": "user", "content": messages}] if isinstance(messages, str) else messages)
    if msgs[-1]["role"] != "user":
        raise InputError("guarded generation answers the user: the last message must be the user's turn")
    return msgs


class _Run:
    """One guarded generation. `chunks()` drives it: a generator of released text; `result` at its end."""

    def __init__(self, llm, llm_tokenizer, stream_guard: StreamGuard, messages, *, max_new_tokens: int = 256,
                 on_unsafe: OnUnsafe | str = OnUnsafe.ROLLBACK, hold_tokens: int = DEFAULT_HOLD_TOKENS,
                 buffer_tokens: int = 40, max_retries: int = 5, intervention: str = "introspect",
                 critique_tokens: int = 48, refusal_message: str = DEFAULT_REFUSAL, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 logits_processor=None, stop_token_ids: Sequence[int] | None = None, push_ids: bool | None = None):
        if not isinstance(llm, torch.nn.Module):
            raise InputError(f"llm must be a transformers causal LM (a torch module), got {type(llm).__name__}")
        if not isinstance(stream_guard, StreamGuard):
            raise InputError(f"stream_guard must be a qguard.stream.StreamGuard, got {type(stream_guard).__name__}")
        if getattr(llm_tokenizer, "backend_tokenizer", None) is None:
            raise InputError("llm_tokenizer must be a fast transformers tokenizer (with tokenizer.json)")
        self.msgs = _check_messages(messages)
        self.mode = OnUnsafe(on_unsafe)
        self.max_new_tokens = check_int(max_new_tokens, "max_new_tokens")
        hold_tokens, buffer_tokens = check_int(hold_tokens, "hold_tokens", 0), check_int(buffer_tokens, "buffer_tokens", 0)
        self.hold = buffer_tokens if self.mode is OnUnsafe.ROLLBACK else hold_tokens
        self.max_retries = check_int(max_retries, "max_retries", 0)
        self.critique_tokens = check_int(critique_tokens, "critique_tokens")
        if not isinstance(intervention, str) or not intervention.strip():
            raise InputError("intervention must be 'nudge', 'introspect' or the (non-empty) text to insert")
        try:
            self.intervention: _Intervention | str = _Intervention(intervention)
        except ValueError:
            self.intervention = intervention  # an operator's own text
        if not isinstance(refusal_message, str) or not refusal_message.strip():
            raise InputError("refusal_message must be non-empty text")
        self.refusal_message = refusal_message
        if not isinstance(do_sample, bool):
            raise InputError(f"do_sample must be True or False, got {do_sample!r}")
        temperature, top_p = check_number(temperature, "temperature"), check_number(top_p, "top_p")
        if temperature <= 0:
            raise InputError(f"temperature must be above 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        top_k = check_int(top_k, "top_k", 0)
        if seed is not None:
            check_int(seed, "seed", 0)
        if push_ids is not None and not isinstance(push_ids, bool):
            raise InputError(f"push_ids must be True, False or None, got {push_ids!r}")

        self.llm, self.tok, self.sg = llm, llm_tokenizer, stream_guard
        self.device = next(llm.parameters()).device
        params = inspect.signature(llm.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.x renamed it
        self._keep_one = "logits_to_keep" in params
        self.push_ids = _same_vocab(llm_tokenizer, stream_guard.tokenizer) if push_ids is None else push_ids
        eos = getattr(getattr(llm, "generation_config", None), "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if llm_tokenizer.eos_token_id is not None:
            eos.append(llm_tokenizer.eos_token_id)
        if self.push_ids:
            eos += [IM_END, ENDOFTEXT]  # they end the turn for the guard: never answer tokens
        for t in stop_token_ids or ():
            eos.append(check_int(t, "stop_token_ids entry", 0))
        self.eos = frozenset(eos)
        self.n_vocab = len(llm_tokenizer)  # an LLM's padding rows past the tokenizer are never sampled
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )
        if logits_processor is not None and not all(callable(p) for p in logits_processor):
            raise InputError("logits_processor must be a list of transformers logits processors (callables)")
        self.do_sample = do_sample
        self.user_processors = LogitsProcessorList(logits_processor) if logits_processor else None
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        self.warpers = warpers
        self.generator = None
        if do_sample and seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.result: GuardedGeneration | None = None

    # ------------------------------------------------------------------------------------ the LLM

    def _forward(self, ids: list[int], cache) -> torch.Tensor:
        """Logits [1, vocab] of the next token after feeding `ids` on top of `cache`."""
        kw = {self._cache_kw: cache, "use_cache": True}
        if self._keep_one:
            kw["logits_to_keep"] = 1
        with torch.no_grad():  # not around the generator: grad mode is per thread, the caller's between chunks
            out = self.llm(input_ids=torch.tensor([ids], device=self.device), **kw)
        logits = out.logits[:, -1].float()
        if logits.shape[-1] > self.n_vocab:
            logits[:, self.n_vocab:] = float("-inf")
        return logits

    def _sample(self, context: list[int], logits: torch.Tensor, answer: bool) -> int:
        """The next token; processors see the LLM's whole context, as in transformers' generate."""
        processors = self.user_processors if answer else None
        ids = torch.tensor([context], device=self.device) if processors or self.warpers else None
        if processors:
            logits = processors(ids, logits)
        if not self.do_sample:
            return int(logits.argmax(-1))
        logits = self.warpers(ids, logits)
        return int(torch.multinomial(logits.softmax(-1), 1, generator=self.generator))

    def _critique(self, answer_text: str) -> list[int]:
        """The LLM's own critique of its flagged answer, in a context of its own (a fresh cache):
        the conversation, its answer as an assistant turn, then the introspection request."""
        msgs = [*self.msgs, {"role": "assistant", "content": answer_text if answer_text.strip() else "..."},
                {"role": "user", "content": INTROSPECTION_PROMPT}]
        context = chat_ids(self.tok, msgs, add_generation_prompt=True, enable_thinking=False)
        cache, feed, out = self._new_cache(), context, []
        for _ in range(self.critique_tokens):
            t = self._sample(context, self._forward(feed, cache), answer=False)
            if t in self.eos:
                break
            out.append(t)
            context.append(t)
            feed = [t]
        return out

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    # ------------------------------------------------------------------------------------ the loop

    def chunks(self) -> Iterator[str]:
        sg = self.sg
        lead = sg.open(self.msgs)
        self.sessions: list[StreamSession] = [lead]
        try:
            yield from self._loop(lead)
        finally:
            for s in self.sessions:
                s.close()

    def _loop(self, lead: StreamSession) -> Iterator[str]:
        tok, rollback = self.tok, self.mode is OnUnsafe.ROLLBACK
        prompt = lead.prompt
        # the checkpoint: a session that follows the release point (rollback mode with retries only)
        try:
            ckpt = lead.fork() if rollback and self.max_retries > 0 else None
        except CapacityError as e:
            raise CapacityError(f"on_unsafe='rollback' needs two stream sessions per generation (the live one "
                                f"and its checkpoint): {e}") from None
        if ckpt is not None:
            self.sessions.append(ckpt)
        llm_ids = chat_ids(tok, self.msgs, add_generation_prompt=True, enable_thinking=False)
        cache, feed = self._new_cache(), list(llm_ids)
        text = _Text(tok)
        answer_pos: list[int] = []  # position in llm_ids of each answer token of the current branch
        verdicts: list[TokenVerdict] = []  # the live session's, over the current branch
        ckpt_verdicts: list[TokenVerdict] = []
        ckpt_tokens = ckpt_chars = 0  # released tokens / text the checkpoint has judged
        ckpt_blocked = False
        marks: deque[tuple[int, int]] = deque()  # (guard verdicts so far, LLM tokens they cover), per push
        safe = released = 0  # LLM answer tokens judged far enough behind / given to the caller
        generated = rolled_back = 0
        rollbacks: list[Rollback] = []
        finish_reason = "stop"

        def sync_checkpoint() -> None:
            nonlocal ckpt_tokens, ckpt_chars, ckpt_blocked
            if ckpt is None or ckpt_tokens == released:
                return
            if self.push_ids:
                vs = ckpt.push(text.ids[ckpt_tokens:released])
            else:
                end = text.end_of(released)
                vs = ckpt.push_text(text.text[ckpt_chars:end])
                ckpt_chars = end
            ckpt_tokens = released
            record_checkpoint(vs)

        def record_checkpoint(vs: list[TokenVerdict]) -> None:
            nonlocal ckpt_blocked
            ckpt_verdicts.extend(vs)
            # the same tokens, judged again in another batch: a numeric tie may still tip the other way,
            # and a blocked checkpoint cannot be a rollback point (fail closed: refuse)
            ckpt_blocked = ckpt_blocked or any(v.stop for v in vs)

        while True:
            done = len(text.ids) >= self.max_new_tokens
            if done:
                finish_reason = "length"
            else:
                t = self._sample(llm_ids, self._forward(feed, cache), answer=True)
                done = t in self.eos
                if done:
                    finish_reason = "stop"
            if not done:
                generated += 1
                answer_pos.append(len(llm_ids))
                llm_ids.append(t)
                feed = [t]
                delta = text.push(t)
                if self.push_ids:
                    if ckpt is not None and ckpt_tokens < released:
                        out = self.sg.push_many({lead: [t], ckpt: text.ids[ckpt_tokens:released]})
                        ckpt_tokens = released
                        record_checkpoint(out[ckpt])
                        vs = out[lead]
                    else:
                        vs = lead.push([t])
                    if len(vs) != 1:  # every pushed token is an answer token (the turn's ends stop the LLM)
                        raise RuntimeError(f"the guard returned {len(vs)} verdicts for one answer token")
                else:
                    vs = lead.push_text(delta) if delta else []
                    if ckpt is not None and released - ckpt_tokens >= _CHECKPOINT_CHUNK:
                        sync_checkpoint()
            else:
                delta = text.finish()
                vs = []
                if not self.push_ids:
                    vs = (lead.push_text(delta) if delta else []) + lead.flush()
            verdicts.extend(vs)
            stop = next((v for v in vs if v.stop), None)

            if stop is not None:
                if rollback and len(rollbacks) < self.max_retries and not ckpt_blocked:
                    # ---- roll back to the release point and intervene
                    sync_checkpoint()
                    if not ckpt_blocked:
                        branch_text = tok.decode(text.ids, skip_special_tokens=True)
                        discarded = len(text.ids) - released
                        critique: list[int] = []
                        if self.intervention is _Intervention.INTROSPECT:
                            critique = self._critique(branch_text)
                            generated += len(critique)
                            words = tok.decode(critique, skip_special_tokens=True).strip()
                            insert = encode_text(tok, INTROSPECTION_INSERT.format(critique=words))
                        elif self.intervention is _Intervention.NUDGE:
                            insert = encode_text(tok, NUDGE)
                        else:
                            insert = encode_text(tok, self.intervention)
                        # the LLM: everything from the first discarded answer token on goes
                        cut = answer_pos[released] if released < len(answer_pos) else len(llm_ids)
                        held = cache.get_seq_length()
                        if held > cut:
                            cache.crop(cut - held)  # negative: drop that many (transformers 4.x and 5.x)
                        del llm_ids[cut:], answer_pos[released:]
                        llm_ids.extend(insert)
                        feed = list(insert)
                        text.truncate(released)
                        # the guard: the live session goes, the checkpoint's fork carries on from it
                        lead.close()
                        self.sessions.remove(lead)
                        lead = ckpt.fork()
                        self.sessions.append(lead)
                        verdicts = list(ckpt_verdicts)
                        marks.clear()
                        safe = released
                        rolled_back += discarded
                        rollbacks.append(Rollback(released, discarded, stop.unsafe_position, len(insert),
                                                  len(critique)))
                        continue
                # ---- cut, refuse, or out of retries
                refuse = self.mode is not OnUnsafe.CUT
                lead.close()
                self.sessions.remove(lead)
                final, token_verdicts = self._verdict_of_released(ckpt, sync_checkpoint, ckpt_verdicts,
                                                                  text, released, refuse)
                kept = text.ids[:released]
                refusal = encode_text(tok, self.refusal_message) if refuse else []
                self.result = GuardedGeneration(
                    text=text.text[:text.end_of(released)] + (self.refusal_message if refuse else ""),
                    ids=kept + refusal, verdict=final, prompt=prompt, token_verdicts=token_verdicts,
                    finish_reason="refused" if refuse else "content_filter", refused=refuse,
                    retries=len(rollbacks), rolled_back_tokens=rolled_back + len(text.ids) - released,
                    generated_tokens=generated, wait_tokens=generated - released, rollbacks=tuple(rollbacks),
                    pushed_ids=self.push_ids)
                if refuse:
                    yield self.refusal_message
                return

            # ---- release what is judged far enough behind
            if done:
                safe = len(text.ids)
            else:
                if vs:  # LLM tokens whose text the verdicts so far cover
                    judged = (len(verdicts) if self.push_ids else
                              text.tokens_within(len(text.text) - len(lead.pending_text)))
                    marks.append((len(verdicts), judged))
                limit = len(verdicts) - self.hold
                while marks and marks[0][0] <= limit:
                    safe = max(safe, marks.popleft()[1])
            upto = safe
            while upto > released and not text.boundary(upto):
                upto -= 1
            if upto > released:
                chunk = text.text[text.end_of(released):text.end_of(upto)]
                released = upto
                if chunk:
                    yield chunk
            if done:
                break

        final = lead.finish()  # the live session judged exactly the released answer
        self.result = GuardedGeneration(
            text=text.text, ids=list(text.ids), verdict=final, prompt=prompt, token_verdicts=verdicts,
            finish_reason=finish_reason, refused=False, retries=len(rollbacks), rolled_back_tokens=rolled_back,
            generated_tokens=generated, wait_tokens=generated - released, rollbacks=tuple(rollbacks),
            pushed_ids=self.push_ids)

    def _verdict_of_released(self, ckpt, sync_checkpoint, ckpt_verdicts, text: _Text, released: int,
                             refuse: bool) -> tuple[Verdict, list[TokenVerdict]]:
        """The guard's verdict over the released answer (the refusal message included when refusing): the
        checkpoint session when there is one, else a fresh session (one prefill of the released text)."""
        if ckpt is not None:
            sync_checkpoint()
            s, vs = ckpt, list(ckpt_verdicts)
        else:
            s = self.sg.open(self.msgs)
            self.sessions.append(s)
            vs = s.push(text.ids[:released]) if self.push_ids else s.push_text(text.text[:text.end_of(released)])
        if refuse:
            vs += s.push(encode_text(self.tok, self.refusal_message)) if self.push_ids else s.push_text(self.refusal_message)
        vs += s.flush()
        return s.finish(), vs
