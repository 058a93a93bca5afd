"""Download upstream's files (docs_selected.jsonl and its sidecar, the manifest) from the Hugging
Face hub, verified."""

from dataclasses import dataclass
from pathlib import Path

from pgolf.io import read_json, sha256_file

DOCS_FILE = "docs_selected.jsonl"
SIDECAR_FILE = "docs_selected.source_manifest.json"


@dataclass(kw_only=True)
class HubConfig:
    repo_id: str = "willdepueoai/parameter-golf"
    remote_root: str = "datasets"
    revision: str | None = None
    endpoint: str | None = None
    cache_dir: str = "data/hf_cache"
    # Source hub_shards (pgolf.data.hub_shards): the dataset fineweb10B_<variant> of the manifest
    # and how many of its train shards (the first ones) to fetch.
    variant: str = "sp8192"
    train_shards: int = 80

    def __post_init__(self):
        if self.train_shards < 1:
            raise ValueError(f"corpus.hf.train_shards = {self.train_shards}: must be >= 1")
        if not self.variant or "/" in self.variant:
            raise ValueError(f"corpus.hf.variant = {self.variant!r}: must be a dataset suffix "
                             "such as sp8192 (the manifest's fineweb10B_<variant>)")


def download(cfg: HubConfig, filename: str) -> Path:
    # Imported here: huggingface_hub is only needed for this source.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(
            repo_id=cfg.repo_id,
            filename=filename,
            subfolder=cfg.remote_root or None,
            repo_type="dataset",
            revision=cfg.revision,
            endpoint=cfg.endpoint,
            cache_dir=cfg.cache_dir,
        )
    except LocalEntryNotFoundError as err:
        # The hub could not be asked (no network, offline mode, not a hub endpoint) and the cache
        # has no copy. This subclasses EntryNotFoundError, but says nothing about the file.
        remote = f"{cfg.remote_root}/{filename}"
        raise ValueError(f"hub dataset {cfg.repo_id}, file {remote}: not in the cache and the hub "
                         f"could not be asked ({err.__cause__ or err})") from None
    except EntryNotFoundError:
        remote = f"{cfg.remote_root}/{filename}"
        raise ValueError(f"hub dataset {cfg.repo_id}: no file {remote}") from None
    except HfHubHTTPError as err:
        raise ValueError(f"hub dataset {cfg.repo_id}, file {filename}: {err}") from None
    return Path(path)


def fetch_docs(cfg: HubConfig) -> tuple[Path, dict]:
    """Download the documents and their sidecar into the hub cache; verify docs_sha256.

    The cache lives outside the run's outputs, so a failed job does not throw away a large download.
    """
    sidecar_path = download(cfg, SIDECAR_FILE)
    sidecar = read_json(sidecar_path)
    expected = sidecar.get("docs_sha256") if isinstance(sidecar, dict) else None
    if not expected:
        raise ValueError(f"{sidecar_path}: no docs_sha256 to verify {DOCS_FILE} against")
    docs = download(cfg, DOCS_FILE)
    actual = sha256_file(docs)
    if actual != expected:
        raise ValueError(f"{docs}: sha256 {actual} does not match docs_sha256 {expected} "
                         f"in {sidecar_path}")
    keep = ("num_docs", "docs_val", "docs_sha256", "shuffle_seed")
    return docs, {"repo_id": cfg.repo_id, "revision": cfg.revision,
                  **{k: sidecar[k] for k in keep if k in sidecar}}
