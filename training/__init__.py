"""Distillation: trajectory capture, losses, one training loop, one module per method."""
