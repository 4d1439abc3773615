"""``kepler convert``: a released Kepler Codebook or taming-transformers checkpoint as a kepler one.

Writes, into one folder, ``model.pt`` (the checkpoint format :func:`kepler.train.trainer.train`
writes, so ``kepler eval``, ``reconstruct``, ``encode`` and ``decode`` take it as they take a run's
``last.pt``) and ``config.yaml`` (a kepler training config equivalent to the released one, with
``train.init_from`` pointing at ``model.pt``: ``kepler train config.yaml data.train=...`` fine-tunes
the converted model). The conversion itself is :mod:`kepler.models.taming`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from kepler.io.checkpoint import save_checkpoint
from kepler.io.config import merge_config, to_dict
from kepler.io.files import write_atomically
from kepler.models.taming import load_taming

CHECKPOINT_NAME = "model.pt"
CONFIG_NAME = "config.yaml"


def check_outputs(checkpoint: str | os.PathLike, config: str | os.PathLike, out: str | os.PathLike,
                  overwrite: bool = False) -> None:
    """ValueError, before anything is read, when writing into ``out`` would lose a file: an output
    that is one of the inputs (``--out`` the released folder, whose ``config.yaml`` is the input
    config), or an earlier conversion there without ``overwrite``."""
    out = Path(out)
    outputs = [out / CHECKPOINT_NAME, out / CONFIG_NAME]
    inputs = {Path(checkpoint).resolve(): "checkpoint", Path(config).resolve(): "config"}
    for output in outputs:
        if output.resolve() in inputs:
            raise ValueError(f"--out {out}: {output.name} would overwrite the {inputs[output.resolve()]} being "
                             f"converted ({output}); write the conversion into another folder")
    earlier = [output.name for output in outputs if output.exists()]
    if earlier and not overwrite:
        raise ValueError(f"--out {out} holds an earlier conversion ({', '.join(earlier)}); pass --overwrite to "
                         "replace it")


def convert(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike,
    out: str | os.PathLike,
    trusted_globals: Sequence[str] = (),
    stubbed_globals: Sequence[str] = (),
    overwrite: bool = False,
) -> dict:
    """Convert ``checkpoint`` (a Lightning ``.ckpt``) with its YAML ``config`` into the folder ``out``.

    Returns ``{"checkpoint", "config"}`` (the written paths) and ``"model"`` (the converted
    :class:`kepler.models.VQModel`). Raises ValueError (one line) for a config kepler cannot express,
    weights that do not match it, or outputs that would replace an input or (without ``overwrite``)
    an earlier conversion (:func:`check_outputs`); FileNotFoundError for a missing file.
    ``trusted_globals``, ``stubbed_globals``: see :func:`kepler.models.taming.load_taming_checkpoint`.
    """
    check_outputs(checkpoint, config, out, overwrite)
    out = Path(out)
    config_source, sections, released, model = load_taming(checkpoint, config, trusted_globals, stubbed_globals)
    step = released.get("global_step")
    layer = {"name": out.resolve().name, **sections}
    cfg = merge_config("tokenizer", [(config_source, OmegaConf.create(layer))])
    checkpoint_path = save_checkpoint(
        {
            "model": model.state_dict(),
            "config": to_dict(cfg),
            # The released run's step, for the record (eval reports it).
            "step": step if isinstance(step, int) else 0,
            "converted_from": {"checkpoint": str(checkpoint), "config": str(config)},
        },
        out / CHECKPOINT_NAME,
    )
    layer["train"] = {"init_from": str(checkpoint_path.resolve())}
    config_path = out / CONFIG_NAME
    header = (
        f"# Converted by kepler convert from {checkpoint} and {config}.\n"
        f"# Fine-tune: kepler train {config_path} data.train=IMAGES data.val=IMAGES\n"
    )
    text = header + yaml.safe_dump(layer, sort_keys=False)
    write_atomically(config_path, lambda f: f.write(text.encode()))
    return {"checkpoint": checkpoint_path, "config": config_path, "model": model}
