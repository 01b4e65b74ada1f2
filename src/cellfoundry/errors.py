"""Errors that name what went wrong, and where."""

from __future__ import annotations

from pathlib import Path


class CellfoundryError(Exception):
    """Base class of the errors the command line reports as one clear line."""


class DatasetError(CellfoundryError):
    """Bad input in one dataset: names the dataset, the file and what is wrong.

    Parameters
    ----------
    dataset
        Name of the dataset (the `dataset` column of the dataset sheet).
    file
        The file that holds the problem.
    problem
        What is wrong, in words a user can act on.
    """

    def __init__(self, dataset: str, file: str | Path | None, problem: str) -> None:
        self.dataset = dataset
        self.file = str(file) if file is not None else None
        self.problem = problem
        where = f"dataset '{dataset}'"
        if self.file is not None:
            where += f", file '{self.file}'"
        super().__init__(f"{where}: {problem}")


class ConfigError(CellfoundryError):
    """A configuration value, split file or dataset sheet that cannot be used."""


class ModelFolderError(CellfoundryError, ValueError):
    """An exported model folder that is missing, or not the kind of model asked for."""
