"""Choosing the layer to tune: the outlier rule (``dominant``) and the ZO sensitivity profile.

:func:`task_sensitivity` runs :func:`layerzo.zo.sensitivity.layer_sensitivity` on a
few training batches of a task with the task's own loss (the one ``tune``
minimises), so the numbers say how strong and stable the ZO signal of each
layer is for THIS task.
"""

from __future__ import annotations

import os

from layerzo.data.chat import render_chat
from layerzo.data.objectives import Objective, resolve_objective, teacher_forced
from layerzo.data.tasks import load_task
from layerzo.errors import TaskError
from layerzo.model.loading import LoadedModel
from layerzo.tune.batches import train_batches
from layerzo.zo.sensitivity import SensitivityConfig, SensitivityReport, layer_sensitivity

def task_sensitivity(loaded: LoadedModel, task: str, data_dir: str | os.PathLike | None = None, *,
                     config: SensitivityConfig = SensitivityConfig(), num_batches: int = 2, batch_size: int = 8,
                     max_length: int = 128, num_train: int = 1000, seed: int = 0,
                     layers=None, objective: str = "auto") -> SensitivityReport:
    """The sensitivity profile of every layer on ``num_batches`` seeded training batches of ``task``.

    The batches are the first ones ``tune`` would draw with the same seed and
    batch size; the loss is ``tune``'s for the same ``objective``.
    """
    if type(num_batches) is not int or num_batches < 1 or type(batch_size) is not int or batch_size < 1:
        raise TaskError(f"the sensitivity profile needs ≥ 1 batch of ≥ 1 example, got {num_batches} × {batch_size}")
    splits = load_task(task, None if data_dir is None else str(data_dir), num_train=num_train, num_dev=0,
                       num_test=0, seed=seed)
    if not splits.train:
        raise TaskError(f"task {task!r} has no training examples")
    name = teacher_forced(resolve_objective(objective, generative=splits.generative, task=splits.name))
    if splits.chat:
        splits = render_chat(splits, loaded.tokenizer)
    loss = Objective(name, loaded.tokenizer, max_length=max_length)
    stream = train_batches(len(splits.train), batch_size, seed)
    batches = [loss.encode([splits.train[i] for i in next(stream)]) for _ in range(num_batches)]
    return layer_sensitivity(loaded.model, loaded.layout, batches, lambda b: loss.loss(loaded.model, b), config,
                             layers=layers, model_name=loaded.source.name)
