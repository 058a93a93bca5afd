"""Analyses of trained models, each statistic beside its null baseline or noise floor."""
