"""Guard families: one module per checkpoint family holds all of its format knowledge.

`families.gen` (Qwen3Guard-Gen: guard prompt, answer grammar, parser, result -> Verdict) and
`families.stream` (Qwen3Guard-Stream: labels, layout, turn reader, head outputs -> verdicts) know their
format and nothing of engines or runtimes; `families.registry` maps a checkpoint's config.json onto a
family, and is the only place that branches on one. This package imports nothing, so importing one family
stays cheap and cycle-free.
"""
