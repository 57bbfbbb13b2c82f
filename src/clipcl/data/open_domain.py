"""Label spaces of the open-domain protocols (CoLeCLIP, Li et al. 2024: ODCL-TIL and ODCL-CIL).

Datasets from many domains arrive one per task, and their classes may overlap: MNIST's digits and
sklearn's digits are both ``0`` .. ``9``; EuroSAT and CIFAR-100 both have ``forest``. A class is its
**exact name** (case and spelling as the dataset writes it): every task that holds that name holds
the same class. Following the official code (YukunLi99/CoLeCLIP @ c6f8d34):

- **Pooled templates** (``engine/trainer.py:234-257``, ``get_dup_cls_template``). A name that more
  than one task of the stream holds is prompted with the templates of every task holding it, in
  stream order (clipcl drops repeated templates, keeping the first: the official code concatenates
  the lists, so two datasets with one template list would count it twice). The official code
  makes two exceptions (``trainer.py:246-256``): ``forest`` and ``river`` take EuroSAT's templates
  alone (:data:`TEMPLATE_OWNER`); clipcl pools them too, as the issue and the paper describe shared
  classes, and keeps the exception as an option (``stream.official_template_owners``). The pool is over the whole stream, seen and unseen tasks alike
  (the official code pools over all of ``TASK_ORDER``), so a class has one text in every row and in
  both protocols (the TIL logits are a column subset of the CIL ones: ``trainer.py:690``).
- **ODCL-TIL**: the task id is known; a task's images are scored among its own classes.
- **ODCL-CIL**: no task id. After training task ``t``, the images of a seen task ``d <= t`` are scored
  among the de-duplicated union of the classes of tasks ``0..t``, in order of first appearance
  (``trainer.py:277-300``, ``get_cls_target``: ``OrderedDict.fromkeys``); an unseen task ``d > t``
  (and every task in the zero-shot row, ``t = -1``) among its own classes (``trainer.py:571-572``).

Held-out datasets are not part of the stream: they keep their own classes and templates. Which tasks
hold a class: :meth:`clipcl.data.streams.Stream.tasks_containing`.
"""

from __future__ import annotations

from collections.abc import Sequence

from clipcl.data.streams import OPEN_DOMAIN_PROTOCOLS, ClassText, Task

TEMPLATE_OWNER: dict[str, str] = {"forest": "eurosat", "river": "eurosat"}
"""Shared class name -> the task (dataset name) whose templates alone prompt it, when that task is in
the stream; the official code's exception for its MTIL datasets (``engine/trainer.py:246-256``)."""


def pooled_classes(tasks: Sequence[Task], owners: dict[str, str] | None = None) -> dict[str, ClassText]:
    """Every class name of the stream -> the :class:`ClassText` evaluation prompts it with.

    A name that one task holds keeps that task's ClassText; a shared name gets the templates of every
    task holding it, in stream order, without repeats; a name in ``owners`` (e.g. :data:`TEMPLATE_OWNER`)
    takes its owner task's templates alone when that task is in the stream.
    """
    owners = {} if owners is None else owners
    holders: dict[str, list[ClassText]] = {}
    holder_tasks: dict[str, list[str]] = {}
    for task in tasks:
        for class_text in task.classes:
            holders.setdefault(class_text.name, []).append(class_text)
            holder_tasks.setdefault(class_text.name, []).append(task.name)
    pooled: dict[str, ClassText] = {}
    for name, texts in holders.items():
        if len(texts) == 1:
            pooled[name] = texts[0]
            continue
        owner = owners.get(name)
        if owner in holder_tasks[name]:
            texts = [texts[holder_tasks[name].index(owner)]]
        templates = dict.fromkeys(template for class_text in texts for template in class_text.templates)
        pooled[name] = ClassText(name, tuple(templates))
    return pooled


def own_classes(tasks: Sequence[Task], task_index: int, pooled: dict[str, ClassText] | None = None) -> list[ClassText]:
    """Task ``task_index``'s own classes, in its target order, as evaluation prompts them (``pooled``:
    :func:`pooled_classes` of the stream; default: pooled without owners)."""
    pooled = pooled_classes(tasks) if pooled is None else pooled
    return [pooled[class_text.name] for class_text in tasks[task_index].classes]


def open_domain_label_space(tasks: Sequence[Task], protocol: str, after_task: int, eval_task: int,
                            owners: dict[str, str] | None = None) -> tuple[list[ClassText], dict[int, int]]:
    """The label space and dataset-label -> index map of entry (after ``after_task``, on ``eval_task``)
    under ``protocol`` (``open_domain_til`` or ``open_domain_cil``); ``after_task`` -1 is the zero-shot row.
    ``owners``: see :func:`pooled_classes`."""
    if protocol not in OPEN_DOMAIN_PROTOCOLS:
        raise ValueError(f"not an open-domain protocol: {protocol!r}")
    pooled = pooled_classes(tasks, owners)
    task = tasks[eval_task]
    if protocol == "open_domain_til" or eval_task > after_task:
        return own_classes(tasks, eval_task, pooled), dict(task.target_of_label)
    names = dict.fromkeys(class_text.name for seen in tasks[: after_task + 1] for class_text in seen.classes)
    index_of_name = {name: index for index, name in enumerate(names)}
    return ([pooled[name] for name in names],
            {label: index_of_name[task.classes[index].name] for label, index in task.target_of_label.items()})
