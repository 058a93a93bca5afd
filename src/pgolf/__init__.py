"""pgolf: a Snakemake data-and-artifact pipeline for the OpenAI Parameter Golf challenge."""

__version__ = "0.1.0"
