"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class SkipToolError(Exception):
    """An error caused by the user's input (model, data, config, paths), reported without a traceback."""


class ModelLoadError(SkipToolError):
    """The model could not be found, read or is not a supported architecture."""


class ConfigError(SkipToolError):
    """A skip config is malformed, of an unknown version, or does not match the model."""


class DataError(SkipToolError):
    """A dataset is missing, unreadable or empty."""


class MissingDependencyError(SkipToolError):
    """An optional package (onnxruntime-gpu, tensorrt, matplotlib, ...) is needed but not installed."""
