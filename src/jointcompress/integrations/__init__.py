"""Integrations of the compression session with other training loops (transformers.Trainer)."""
