"""Gen classification throughput: official-style HF `generate` batch 1, batched HF `generate`, and qguard.

    python benchmarks/gen_bench.py --preset tiny     # quick (well under a minute on 2 CPU cores)
    python benchmarks/gen_bench.py                   # Qwen3Guard-Gen-0.6B architecture (minutes on CPU)

All three run in one process on the same random weights in the exact architecture (same compute as the
real model) and the same conversations: rows of ../shared/data/train (half prompt, half response rows,
a fixed seeded sample, content capped at --max-content-tokens), or synthetic text when that folder is
absent. Message content is never printed.
- hf_b1: `Qwen3ForCausalLM.generate(do_sample=False)`, one conversation at a time (the official eval).
- hf_batched: the same with left-padded batches of --batch-size in input order.
- qguard: `GenEngine.classify` over all conversations (prefix cache, length buckets, draft verification);
  on CPU once per precision variant (--precisions): fp32 (the default qguard), bf16, int8 / int8-weight
  decoder weights (`qguard.model.quant`) with fp32 or bf16 (`bf16+int8`) for the rest, all copies of the
  same fp32 weights; batched HF `generate` also runs in bf16 on CPU.
Every method decodes up to --max-new-tokens greedy tokens and stops at <|im_end|>/<|endoftext|>. Random
weights never produce a well-formed answer, so all methods decode the full budget here: the qguard
figure excludes its main decode saving on real checkpoints (a well-formed answer is verified in 2-3
batched forwards instead of ~10-15 decode steps) and keeps the prefill savings (shared instruction
header, no padding waste).
Agreement: the fraction of conversations whose parsed result (severity, categories, refusal, or the
parse error) equals hf_b1's; `token_agreement_with_generate` compares the raw answer tokens. Per variant
also the largest difference of its severity probabilities to qguard fp32's (random weights: probability
differences are what carries over; the fitted answers sit far from any decision boundary).
The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import time
from pathlib import Path

import torch
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3ForCausalLM

from qguard.engine.gen import GenEngine
from qguard.families.gen import parse_answer
from qguard.families.registry import GenFamily
from qguard.model.gen import GenGuardModel
from qguard.model.quant import kernel_of, quantize_model
from qguard.model.qwen3 import Qwen3Config
from qguard.testing import gen_config
from qguard.tokenizer import ENDOFTEXT, IM_END, encode, load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"
PROMPT_FILES = ["benign_self_instruct.jsonl", "jbb_behaviors.jsonl", "coconot.jsonl", "benign_arena_hard.jsonl"]
RESPONSE_FILES = ["gptfuzz_responses.jsonl", "jailbreakbench_responses.jsonl"]
STOP = (IM_END, ENDOFTEXT)


def build_models(preset: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """qguard's GenGuardModel and transformers' Qwen3ForCausalLM with the same random weights."""
    cfg = gen_config(preset)
    torch.manual_seed(seed)
    ours = GenGuardModel(Qwen3Config.from_dict(cfg))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    ours = ours.to(device=device, dtype=dtype).eval()
    ours.model.rotary_emb.reset()
    ours.fuse_for_inference()  # the form qguard's loaders return (fewer kernels per step)
    hf_cfg = HFQwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    hf = Qwen3ForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    hf.tie_weights()
    return ours, hf.to(device=device, dtype=dtype).eval()


ANSWERS = {
    "prompt": ["Safety: Safe\nCategories: None", "Safety: Unsafe\nCategories: Violent",
               "Safety: Controversial\nCategories: Politically Sensitive Topics",
               "Safety: Unsafe\nCategories: Non-violent Illegal Acts"],
    "response": ["Safety: Safe\nCategories: None\nRefusal: No", "Safety: Safe\nCategories: None\nRefusal: Yes",
                 "Safety: Unsafe\nCategories: Violent\nRefusal: No",
                 "Safety: Controversial\nCategories: Unethical Acts\nRefusal: No"],
}


def fit_answer_head(ours: GenGuardModel, hf, tok, reqs, steps: int = 300) -> None:
    """Give the random model well-formed answers, like a real Gen checkpoint's, on these conversations.

    The decoder stays random; only the lm_head is replaced (untied): rows for the ~40 answer tokens are
    fitted on the frozen decoder's hidden states so that greedy decoding of each benchmark conversation
    yields one of several well-formed answers (varied labels); every other row is 0. Same weights in
    both models, so agreement stays meaningful; the compute per token is unchanged.
    """
    answers = [encode(tok, ANSWERS[r.target][i // 2 % 4]) + [IM_END] for i, r in enumerate(reqs)]  # rows alternate targets
    vocab = sorted({t for a in answers for t in a})
    feats, targets = [], []
    with torch.no_grad():
        for r, a in zip(reqs, answers):
            h = ours.model(torch.tensor([r.ids + a[:-1]], device=ours.lm_head.weight.device))[0]
            feats.append(h[len(r.ids) - 1 :].float())
            targets += [vocab.index(t) for t in a]
    x, y = torch.cat(feats), torch.tensor(targets, device=feats[0].device)
    w = torch.zeros(len(vocab), x.shape[1], device=x.device, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(steps):
        logits = torch.cat([x @ w.T, x.new_zeros(len(x), 1)], 1)  # last column: every other token (0)
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head = torch.zeros_like(ours.lm_head.weight)
    head[torch.tensor(vocab, device=head.device)] = w.detach().to(head.dtype)
    ours.lm_head.weight = torch.nn.Parameter(head.clone(), requires_grad=False)
    hf.lm_head.weight = torch.nn.Parameter(head.clone(), requires_grad=False)
    hf.config.tie_word_embeddings = False


def load_conversations(tok, n: int, max_tokens: int, seed: int) -> tuple[list[list[dict]], str]:
    rng = random.Random(seed)

    def cap(text: str) -> str:
        ids = encode(tok, text)
        return tok.decode(ids[:max_tokens]) if len(ids) > max_tokens else text

    if not DATA.is_dir():
        words = "please explain how the system works and what happens next in this short story".split()
        convs = []
        for i in range(n):
            conv = [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(8, 80)))}]
            if i % 2:
                conv.append({"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))})
            convs.append(conv)
        return convs, "synthetic"
    pools = []
    for files in (PROMPT_FILES, RESPONSE_FILES):
        rows = []
        for f in files:
            p = DATA / f
            if p.is_file():
                rows += [json.loads(line)["messages"] for line in p.read_text("utf-8").splitlines() if line.strip()]
        rng.shuffle(rows)
        pools.append(rows)
    convs = []
    for i in range(n):
        pool = pools[i % 2] or pools[0]
        convs.append([{"role": m["role"], "content": cap(m["content"])} for m in pool[i // 2 % len(pool)]])
    return convs, "shared/data/train (seeded sample)"


def parsed(tok, ids: list[int], target: str):
    try:
        a = parse_answer(tok.decode(ids), target)
        return (a.severity, a.categories, a.refusal)
    except ValueError as e:
        return ("error", str(e))


@torch.inference_mode()
def run_hf_b1(hf, prompts: list[list[int]], max_new: int, device) -> list[list[int]]:
    out = []
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        g = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                        eos_token_id=list(STOP), pad_token_id=ENDOFTEXT)
        out.append([t for t in g[0, len(ids):].tolist() if t not in STOP])
    return out


@torch.inference_mode()
def run_hf_batched(hf, prompts: list[list[int]], max_new: int, batch: int, device) -> list[list[int]]:
    out = []
    for a in range(0, len(prompts), batch):
        group = prompts[a : a + batch]
        T = max(len(p) for p in group)
        x = torch.full((len(group), T), ENDOFTEXT, dtype=torch.long)
        mask = torch.zeros(len(group), T, dtype=torch.long)
        for i, p in enumerate(group):  # left padding, as generate expects for decoder-only models
            x[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        g = hf.generate(x.to(device), attention_mask=mask.to(device), max_new_tokens=max_new, do_sample=False,
                        eos_token_id=list(STOP), pad_token_id=ENDOFTEXT)
        for row in g[:, T:].tolist():
            ans = []
            for t in row:
                if t in STOP:
                    break
                ans.append(t)
            out.append(ans)
    return out


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return r, time.perf_counter() - t


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


PRECISIONS = {  # variant -> (dtype of everything but the decoder projections, their quantization)
    "fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, "int8"),
    "int8-weight": (torch.float32, "int8-weight"), "bf16+int8": (torch.bfloat16, "int8"),
    "bf16+int8-weight": (torch.bfloat16, "int8-weight"),
}


def variant(ours: GenGuardModel, name: str) -> GenGuardModel:
    """A copy of the fp32 benchmark model in a precision variant (quantized from the fp32 weights)."""
    dtype, scheme = PRECISIONS[name]
    if dtype == torch.float32 and scheme is None:
        return ours
    m = copy.deepcopy(ours)
    if scheme:  # the int8 kernel timed on the Gen family's workload, as the loader does
        quantize_model(m, scheme, rows=GenFamily.quantize_rows)
    return m.to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.6B", choices=["tiny", "0.6B"])
    ap.add_argument("--n", type=int, default=None, help="conversations (default: 16 for 0.6B on CPU, else 64)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-content-tokens", type=int, default=128, help="cap on each message's tokens")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="GPU runs (CPU: --precisions)")
    ap.add_argument("--precisions", nargs="+", default=None, choices=list(PRECISIONS),
                    help="CPU: the qguard variants to time (default: all; fp32 first, the reference)")
    ap.add_argument("--no-hf-b1", action="store_true", help="skip the (slow) batch-1 HF baseline")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--answers", default="formatted", choices=["formatted", "random"],
                    help="formatted: fit the lm_head so answers are well-formed (see fit_answer_head); "
                         "random: untouched random weights (garbage answers, every method decodes the budget)")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = device.type == "cpu"
    if cpu:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if cpu else torch.bfloat16)
    precisions = (args.precisions or list(PRECISIONS)) if cpu else ["gpu"]
    if cpu and "fp32" not in precisions:
        precisions = ["fp32", *precisions]
    n = args.n or (16 if args.preset == "0.6B" and cpu else 64)
    t0 = time.perf_counter()
    tok = load_tokenizer(None)
    ours, hf = build_models(args.preset, torch.float32 if cpu else dtype, device, args.seed)
    engine = GenEngine(ours, tok, max_new_tokens=args.max_new_tokens, max_batch=args.batch_size)
    convs, source = load_conversations(tok, n, args.max_content_tokens, args.seed)
    reqs = [engine.prepare(c) for c in convs]
    prompts = [r.ids for r in reqs]
    if args.answers == "formatted":
        fit_answer_head(ours, hf, tok, reqs)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16) if cpu else None
    run_hf_b1(hf, prompts[:1], 2, device)  # warm-up

    ref, t_b1 = (None, None) if args.no_hf_b1 else timed(lambda: run_hf_b1(hf, prompts, args.max_new_tokens, device))
    bat, t_bat = timed(lambda: run_hf_batched(hf, prompts, args.max_new_tokens, args.batch_size, device))
    bat16, t_bat16 = (timed(lambda: run_hf_batched(hf16, prompts, args.max_new_tokens, args.batch_size, device))
                      if cpu else (None, None))
    ref = ref if ref is not None else bat  # agreement baseline: batch-1 generate, else batched fp32
    targets = [r.target for r in reqs]

    def agree(ids: list[list[int]]) -> float:
        return sum(parsed(tok, a, t) == parsed(tok, b, t) for a, b, t in zip(ids, ref, targets)) / n

    runs, kernels = {}, {}  # variant -> (seconds, results); variant -> its int8 kernel (quantize="int8")
    for prec in precisions:
        m = variant(ours, prec) if cpu else ours
        kernels[prec] = kernel_of(m)
        eng = GenEngine(m, tok, max_new_tokens=args.max_new_tokens, max_batch=args.batch_size)
        eng.classify(convs[:2])  # warm-up (and the per-header prefix caches, computed once per engine)
        res, t_q = timed(lambda eng=eng: eng.run(reqs))
        runs[prec] = (t_q, res)
        del m, eng
        gc.collect()
    base = runs[precisions[0]][1]

    def sev_diff(res) -> float:
        return max(abs(a.severity_probs[k] - b.severity_probs[k]) for a, b in zip(res, base) for k in a.severity_probs)

    lens = [len(p) for p in prompts]
    print(f"Gen classification, preset {args.preset}, {device.type} ({machine(device)}), "
          f"{'float32 (reference; variants per row)' if cpu else str(dtype)[6:]}")
    print(f"{n} conversations from {source}: prompt tokens min {min(lens)} / mean {sum(lens) / n:.0f} / "
          f"max {max(lens)}, header shared by qguard: {reqs[0].prefix_len} (prompt) tokens; "
          f"max_new_tokens {args.max_new_tokens}, batch {args.batch_size}")
    answers = [parsed(tok, a, t) for a, t in zip(ref, targets)]
    print(f"answers ({args.answers}): {sum(a[0] != 'error' for a in answers)}/{n} well-formed, "
          f"severities {sorted({str(a[0].value) for a in answers if a[0] != 'error'})}")
    print(f"{'method':<34}{'seconds':>10}{'class/s':>10}{'x qg fp32':>11}{'x HF bat':>10}{'labels':>8}{'max|dp|':>9}")
    rows = [("HF generate, batch 1" + (" fp32" if cpu else ""), t_b1, None, None),
            ("HF generate, batched" + (" fp32" if cpu else ""), t_bat, agree(bat), None)]
    if cpu:
        rows.append(("HF generate, batched bf16", t_bat16, agree(bat16), None))
    for prec in precisions:
        t_q, res = runs[prec]
        kern = f" ({kernels[prec]})" if kernels.get(prec) else ""
        rows.append((f"qguard GenEngine{' ' + prec if cpu else ''}{kern}", t_q, agree([r.token_ids for r in res]),
                     sev_diff(res)))
    t_q32 = runs[precisions[0]][0]
    for name, t, ag, d in rows:
        if t is None:
            continue
        print(f"{name:<34}{t:>10.2f}{n / t:>10.2f}{t_q32 / t:>11.2f}{t_bat / t:>10.2f}"
              f"{'' if ag is None else f'{100 * ag:.0f}%':>8}{'' if d is None else f'{d:.4f}':>9}")
    res32 = runs[precisions[0]][1]
    ours_ids = [r.token_ids for r in res32]
    print(json.dumps({
        "preset": args.preset, "device": device.type, "machine": machine(device),
        "dtype": "float32" if cpu else str(dtype)[6:], "answers": args.answers, "n": n,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "mean_prompt_tokens": round(sum(lens) / n, 1),
        "hf_b1_per_s": None if t_b1 is None else round(n / t_b1, 3), "hf_batched_per_s": round(n / t_bat, 3),
        **({"hf_batched_bf16_per_s": round(n / t_bat16, 3)} if cpu else {}),
        "qguard_per_s": round(n / t_q32, 3),
        "speedup_vs_hf_b1": None if t_b1 is None else round(t_b1 / t_q32, 2),
        "speedup_vs_hf_batched": round(t_bat / t_q32, 2),
        "label_agreement_with_generate": agree(ours_ids),
        "token_agreement_with_generate": sum(a == b for a, b in zip(ours_ids, ref)) / n,
        "hf_batched_label_agreement_with_b1": agree(bat),
        "variants": {prec: {"per_s": round(n / t, 3), "speedup_vs_qguard_fp32": round(t_q32 / t, 2),
                            **({"int8_kernel": kernels[prec]} if kernels.get(prec) else {}),
                            "speedup_vs_hf_batched": round(t_bat / t, 2),
                            **({"speedup_vs_hf_batched_bf16": round(t_bat16 / t, 2)} if cpu else {}),
                            "label_agreement_with_generate": agree([r.token_ids for r in res]),
                            "severity_prob_max_diff_vs_fp32": round(sev_diff(res), 6)}
                     for prec, (t, res) in runs.items()} if cpu else None,
        "wall_s": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
