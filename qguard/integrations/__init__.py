"""qguard inside other systems' plugin points (`litellm`: a LiteLLM proxy guardrail). No imports here: each
integration loads its host package only when it is used."""
