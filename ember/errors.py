"""Typed user-facing errors: each says what is wrong and what to do about it."""


class EmberError(Exception):
    """Base class for errors caused by user input (files, parameters, prompts)."""


class ModelLoadError(EmberError):
    """A model file or folder is missing, malformed or uses something unsupported."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one ember implements."""


class InvalidParameterError(EmberError, ValueError):
    """A sampling or engine parameter is out of range."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidParameterError):
    """The prompt (plus requested output) does not fit in the model's context."""


class CompressionError(EmberError):
    """A compression option or its calibration data is unusable (bad method, sparsity, file...)."""
