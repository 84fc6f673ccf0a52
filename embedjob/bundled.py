"""Files that ship inside the package, for the installed commands: the EmbeddingJob CRD
(``kubectl apply`` by ``embedjob dev up``) and the three small sample shards ``embedjob demo``
embeds.

Both are package data found through :mod:`importlib.resources`, never through a source checkout.
Their one copy in the repository stays where people look for it: ``crds/`` is installed as the data
package ``embedjob.crds`` and ``examples/shards/`` as ``embedjob.sample_shards`` (the
``package-dir`` mapping in ``pyproject.toml``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CRD_FILENAME = "embeddingjobs.embedjob.io.yaml"


def _folder(package: str) -> Path:
    # A data package has no __init__.py, so files() gives a multiplexed (namespace) path; its
    # children are real files, because pip installs never run from a zip.
    children = list(resources.files(package).iterdir())
    if not children:
        raise FileNotFoundError(f"package data {package} is empty")
    # Resolved: an editable install links the files from build/__editable__...; what is recorded (the
    # metadata's shard column) is where they really are.
    return Path(str(children[0])).resolve().parent


def crd_manifest() -> Path:
    """The EmbeddingJob CRD manifest (the same bytes as ``crds/`` and the chart's copy)."""
    return _folder("embedjob.crds") / CRD_FILENAME


def sample_shards_dir() -> Path:
    """The folder holding the sample shards ``00000.tar`` .. ``00002.tar``."""
    return _folder("embedjob.sample_shards")


def sample_shards() -> list[Path]:
    return sorted(sample_shards_dir().glob("*.tar"))
