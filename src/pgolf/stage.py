"""Glue for workflow scripts: the rule's log, its config slices and a clean failure on bad input."""

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from pgolf import gpuslots
from pgolf.provenance import Provenance


@contextmanager
def logged(log_path: str) -> Iterator[None]:
    """Send stdout and stderr to the rule's log; a ValueError ends the job with just its message.

    ValueError is what the library raises for a user's mistake (bad file, bad value), so the log
    shows `pgolf: error: ...` instead of a traceback; anything else is a bug and keeps it.
    """
    with open(log_path, "w", buffering=1) as log:
        # Redirect the file descriptors too: C++ libraries (SentencePiece, torch) write to them.
        saved = [os.dup(1), os.dup(2)]
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        try:
            yield
        except ValueError as err:
            print(f"pgolf: error: {err}", file=log)
            sys.exit(1)
        except Exception:
            traceback.print_exc(file=log)
            raise
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)


def provenance(snakemake, *, stage: str) -> Provenance:
    """Provenance of a Snakemake job: its params (config slices + code hash) and its inputs."""
    params = dict(snakemake.params.items())
    code = params.pop("code", None)
    return Provenance(stage=stage, config=params, code=code, inputs=list(snakemake.input))


def claim_gpus(snakemake) -> None:
    """Give a script rule's job the GPUs its `gpu` resource counts: distinct devices on a shared
    machine (pgolf.gpuslots), named in its log."""
    gpuslots.hold(int(getattr(snakemake.resources, "gpu", 0)))
