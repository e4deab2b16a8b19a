"""Problems of a config file, as the loader reports them (no YAML or pydantic needed to
read them: the running agent gets them from the checking process, see
:mod:`agent.config.isolated`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class ConfigIssue:
    """One problem in a config file, printed compiler style."""

    file: str
    line: int
    col: int
    path: str
    message: str
    level: str = "error"
    """``error`` (the file is refused), ``warning`` or ``note`` (printed by validate only)."""

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        level = "" if self.level == "error" else f"{self.level}: "
        return f"{self.file}:{self.line}:{self.col}: {where}{level}{self.message}"


class ConfigError(Exception):
    """The config is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = sorted(set(issues))
        super().__init__("\n".join(str(i) for i in self.issues))
