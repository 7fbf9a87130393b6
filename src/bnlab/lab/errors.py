"""The lab's one error type for a configuration that cannot work."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work: ``field`` names it (its option is ``--field-name``),
    ``message`` says what was expected and what was given."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    @property
    def option(self) -> str:
        return "--" + self.field.replace("_", "-")
