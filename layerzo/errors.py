"""The LayerzoError hierarchy.

Every error a user can cause derives from :class:`LayerzoError`. The CLI prints
``str(error)`` as one line (plus the hint, if any) and exits 1; set
``LAYERZO_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

from pathlib import Path


MAX_MESSAGE_CHARS = 2000  # a refusal longer than this echoes the input back instead of describing it


def _one_line(text: object) -> str:
    """Whitespace (newlines included) folded to single spaces, clipped to MAX_MESSAGE_CHARS."""
    folded = " ".join(str(text).split())
    return folded if len(folded) <= MAX_MESSAGE_CHARS else folded[: MAX_MESSAGE_CHARS - 1] + "…"


class LayerzoError(Exception):
    """Base class: a problem the user can fix, described in one line.

    The message and hint are folded to one line and clipped on construction, so
    no input echoed into a message (a YAML value, a file's bytes) can make it
    span lines or pages.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(_one_line(message))
        self.hint = None if hint is None else _one_line(hint)

    def one_line(self) -> str:
        text = " ".join(str(self).split())
        return f"{text} ({self.hint})" if self.hint else text


class ConfigError(LayerzoError):
    """A recipe, option or config value is invalid."""


class ModelLoadError(LayerzoError):
    """A model could not be found or loaded."""


class OfflineError(ModelLoadError):
    """Something needs the network but HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set."""


class ArchitectureError(LayerzoError):
    """The model's decoder layers could not be located."""


class LayerIndexError(LayerzoError):
    """A requested layer index does not exist in the model."""


class TaskError(LayerzoError):
    """Unknown task, missing split or a malformed data file."""


class DataRowError(TaskError):
    """A single row of a data file is malformed (message names file and line)."""


class PatchError(LayerzoError):
    """A layer patch is missing, corrupt, truncated or untrusted."""


class PatchFormatError(PatchError):
    """A patch manifest declares an unsupported format version or bad fields."""


class BaseMismatchError(PatchError):
    """A patch was made for another base model than the one given."""


class DivergenceError(LayerzoError):
    """Training produced non-finite losses or runaway gradients."""


class OutputExistsError(LayerzoError):
    """The output path exists and --overwrite was not given."""


class OutputPathError(LayerzoError):
    """The output cannot be written where it was asked: a file in the way, a folder for a file, no permission."""


class HubError(LayerzoError):
    """Talking to the Hugging Face Hub failed."""


class EvalError(LayerzoError):
    """lm-evaluation-harness could not run the requested evaluation."""


class ExportError(LayerzoError):
    """ONNX export or its verification failed."""


class CheckpointError(LayerzoError):
    """A training checkpoint is corrupt, truncated, or from another run."""


class TuneInterrupted(LayerzoError):
    """Ctrl-C or SIGTERM stopped ``tune`` after a step; a checkpoint to resume from was saved.

    ``signum`` is the signal that asked to stop (2 = SIGINT, 15 = SIGTERM): the CLI exits with 128 + signum.
    """

    def __init__(self, message: str, checkpoint: Path, step: int, hint: str | None = None, signum: int = 2) -> None:
        super().__init__(message, hint)
        self.checkpoint = checkpoint
        self.step = step
        self.signum = signum
