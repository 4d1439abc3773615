"""A run's class ids: which class each id of a labelled data set stands for, fixed when the run starts.

Class folders are numbered by their sorted names, so a class folder added later (``aaa/``) would
shift every id after it: a resumed run, or the held-out set beside it, would read other classes
under the ids its model learned. So the trainer fixes the classes before it builds any data set: it
sets ``data.classes`` to :func:`run_classes`, which every source then numbers by (the training and
held-out sets alike), and the checkpoint's config records them. A resumed run keeps the recorded
classes over what the data (or ``data.classes``) say now, with a warning; a class folder not among
them is left out with its images (the folder source warns, naming it), and one that is gone keeps
its id, unused. Another run keeps a run's ids by setting ``data.classes`` to its recorded ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset, Subset

from kepler.data.sources import source_classes, with_defaults


def dataset_labels(dataset: Dataset) -> tuple[int, torch.Tensor | None]:
    """The class labels of ``dataset``'s items: ``(num_classes, labels (len(dataset),) int64 in
    [0, num_classes))``, or ``(0, None)`` for a data set without classes.

    A labelled data set has three attributes: ``num_classes`` (an int >= 1), ``classes`` (their
    names in id order) and ``labels``, its items' classes in item order; any other data set is
    unlabelled. A :class:`~torch.utils.data.Subset` (:func:`kepler.data.first_items`) has the labels
    of the items it keeps.
    """
    if isinstance(dataset, Subset):
        num_classes, labels = dataset_labels(dataset.dataset)
        return num_classes, None if labels is None else labels[list(dataset.indices)]
    num_classes = getattr(dataset, "num_classes", 0)
    return (num_classes, dataset.labels) if num_classes else (0, None)


def run_classes(data: Mapping, recorded: Sequence[str] | None = None) -> list[str] | None:
    """The class names, in id order, that a run keeps (what the trainer sets ``data.classes`` to):
    ``recorded`` (the resumed checkpoint's ``data.classes``) when given, else ``data.classes``, else
    the classes of ``data.train`` (:func:`kepler.data.sources.source_classes`); None with
    ``data.labels: none`` or for data without classes."""
    data = with_defaults(data)
    if data["labels"] == "none":
        return None
    given = data["classes"]
    current = list(given) if given is not None else source_classes(data)
    if recorded is None:
        return current
    recorded = list(recorded)
    if current is not None and current != recorded:
        where = "data.classes" if given is not None else f"data.train {data['train']!r}"
        added = [name for name in current if name not in recorded]
        gone = [name for name in recorded if name not in current]
        warnings.warn(f"{where} has other classes than the {len(recorded)} the run recorded (added: "
                      f"{', '.join(added) or 'none'}; gone: {', '.join(gone) or 'none'}): the run keeps its "
                      "recorded class ids", stacklevel=2)
    return recorded
