"""Engines: the only place that knows about batching and KV caches."""
