"""Training tasks: supervised learning and federated self-supervised learning (SimCLR, BYOL).

A task is chosen by name (``[task]`` of a scenario, :class:`TaskConfig`) and
looked up in the registry (:func:`get_task`); it builds the network the
clients train and send and trains it for one round. The evaluation of an
encoder (k-NN and linear probe) is in :mod:`fedmerge.tasks.evaluation`.
"""

from fedmerge.tasks.augment import AugmentConfig, augment
from fedmerge.tasks.byol import BYOLTask, ema_update
from fedmerge.tasks.common import augment_config, fixed_subset
from fedmerge.tasks.config import SSL_OPTIONS, TaskConfig
from fedmerge.tasks.evaluation import encode, knn_accuracy, linear_probe
from fedmerge.tasks.losses import byol_loss, nt_xent
from fedmerge.tasks.network import EncoderWithProjection, mlp_head, ssl_network, strip_classifier
from fedmerge.tasks.registry import LocalRound, Task, get_task, register_task, task_names
from fedmerge.tasks.simclr import SimCLRTask
from fedmerge.tasks.supervised import SupervisedTask

__all__ = [
    "SSL_OPTIONS",
    "AugmentConfig",
    "BYOLTask",
    "EncoderWithProjection",
    "LocalRound",
    "SimCLRTask",
    "SupervisedTask",
    "Task",
    "TaskConfig",
    "augment",
    "augment_config",
    "byol_loss",
    "ema_update",
    "encode",
    "fixed_subset",
    "get_task",
    "knn_accuracy",
    "linear_probe",
    "mlp_head",
    "nt_xent",
    "register_task",
    "ssl_network",
    "strip_classifier",
    "task_names",
]
