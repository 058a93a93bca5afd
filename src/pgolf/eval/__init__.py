"""Evaluation: exact bits per byte over the validation stream."""
