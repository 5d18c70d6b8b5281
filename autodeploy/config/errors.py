"""The one error type for bad configuration: raised before any model work, message names the key or path."""


class ConfigError(ValueError):
    pass
