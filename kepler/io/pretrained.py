"""The exported-folder format: what inference needs, in files that cannot run code.

A pretrained folder (written by ``kepler export``, :meth:`kepler.models.VQModel.save_pretrained`,
:meth:`kepler.models.CodeTransformer.save_pretrained`) holds three files::

    model.safetensors   the state dict (safetensors: tensors and a JSON header, nothing executable)
    config.yaml         format, the model's kind, the weights' file name and SHA-256, training step,
                        the ``model`` config section (as training checkpoints carry it) and the
                        training ``data`` section; a prior's also its tokenizer's record
    README.md           the model card: architecture, data, steps, held-out metrics

A prior's folder also holds its tokenizer, exported into ``tokenizer/`` (:data:`PRIOR_TOKENIZER`), so
that the folder samples on its own; its record (SHA-256, code layout, weights) says which tokenizer
the prior's codes are, as a prior's checkpoint does. ``kind`` is ``tokenizer`` where it is missing
(folders written before priors were exported).

:func:`write_pretrained` writes the files, :func:`read_pretrained` reads them back checked, in this
order, each with a one-line error naming the file: the files exist, ``config.yaml`` is a kepler
pretrained config, the weights file's SHA-256 is the one recorded (a changed, truncated or swapped
file is refused before it is parsed) and the file parses as safetensors. What the weights describe
is checked by the loader that builds the model (:mod:`kepler.models.load`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml

from kepler.io.files import write_atomically
from kepler.io.weights import error_line

FORMAT = "kepler-pretrained/1"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
KINDS = ("tokenizer", "prior")
# An exported prior's tokenizer: a pretrained folder inside the prior's.
PRIOR_TOKENIZER = "tokenizer"


def write_pretrained(directory: str | os.PathLike, weights: Mapping[str, torch.Tensor], manifest: Mapping,
                     card: Callable[[Mapping], str]) -> Path:
    """Write ``weights`` (a state dict), ``config.yaml`` (``manifest``: ``kind``, ``step``, ``data``,
    ``model``, a prior's ``tokenizer``, plus the format and the weights' name and SHA-256 added here) and the model card, ``card(the
    full manifest)``, into ``directory`` (created; the three files replaced if there, each
    atomically). Returns the folder."""
    from safetensors.torch import save

    directory = Path(directory)
    # safetensors refuses tensors that share memory; a copy per entry gives each its own.
    blob = save({key: value.detach().to("cpu", copy=True).contiguous() for key, value in weights.items()},
                metadata={"format": "pt"})
    write_atomically(directory / WEIGHTS_FILE, lambda f: f.write(blob))
    full = {"format": FORMAT, "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(blob).hexdigest()},
            **manifest}
    write_atomically(directory / CONFIG_FILE, lambda f: f.write(yaml.safe_dump(full, sort_keys=False).encode()))
    text = card(full)
    write_atomically(directory / CARD_FILE, lambda f: f.write(text.encode()))
    return directory


def read_manifest(directory: str | os.PathLike) -> dict:
    """``config.yaml`` of a pretrained folder, checked for the keys :func:`read_pretrained` needs (its
    ``kind`` filled in); the weights are not read."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"pretrained model {directory}: {CONFIG_FILE} is missing")
    try:
        manifest = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid YAML: {error_line(exc)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{path} is not a kepler pretrained config: 'format' must be {FORMAT!r}, got {found!r}")
    weights = manifest.get("weights")
    if not isinstance(weights, dict) or not all(isinstance(weights.get(k), str) for k in ("file", "sha256")):
        raise ValueError(f"{path}: 'weights' must map 'file' and 'sha256' to strings, got {weights!r}")
    if Path(weights["file"]).name != weights["file"]:
        raise ValueError(f"{path}: weights.file must be a file name in the same folder, got {weights['file']!r}")
    manifest.setdefault("kind", "tokenizer")
    if manifest["kind"] not in KINDS:
        raise ValueError(f"{path}: 'kind' must be one of {', '.join(KINDS)}, got {manifest['kind']!r}")
    return manifest


def read_pretrained(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.yaml as a dict, the weights)`` of a folder written by :func:`write_pretrained`,
    checked as the module docstring says. FileNotFoundError for a missing folder or file,
    ValueError (one line naming the file) otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"pretrained model folder {directory} does not exist")
    manifest = read_manifest(directory)
    weights_path = directory / manifest["weights"]["file"]
    if not weights_path.is_file():
        raise FileNotFoundError(f"pretrained model {directory}: {weights_path.name} is missing")
    blob = weights_path.read_bytes()  # hashed and parsed from the same bytes: no window to swap the file
    expected, actual = manifest["weights"]["sha256"].lower(), hashlib.sha256(blob).hexdigest()
    if actual != expected:
        raise ValueError(
            f"{weights_path}: SHA-256 {actual} is not the {expected} recorded in {CONFIG_FILE} "
            "(the file was changed or damaged)"
        )
    from safetensors.torch import load

    try:
        weights = load(blob)
    except Exception as exc:  # safetensors raises its own error type, and others for odd headers
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error_line(exc)}") from None
    return manifest, weights
