"""ppd_decode: the runtime half of ppd (model loading, task data and prompts, heads, decoding, evaluation).

Training (``ppd_train``) depends on this package; this package never imports ``ppd_train``.
"""

from ppd_decode.errors import HeadMismatchError, ModelLoadError, PPDError, PromptTooLongError, TaskDataError
from ppd_decode.models.loading import DEFAULT_MODEL, load_model

__all__ = ["load_model", "DEFAULT_MODEL", "PPDError", "ModelLoadError", "TaskDataError", "PromptTooLongError",
           "HeadMismatchError"]
