"""Error types that the CLI turns into one-line messages.

Every problem a user can cause (a bad file, a wrong model, a bad option) is raised as an
``RsLocalError`` so the CLI can print ``error: <message>`` and exit 1 without a traceback,
while library users can still catch the specific subclass.
"""

from __future__ import annotations

from pathlib import Path


class RsLocalError(Exception):
    """Base class for errors caused by user input or environment, not by a bug."""


class FileProblem(RsLocalError):
    """A file the user gave us is unusable; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class VectorFileError(FileProblem):
    """A control-vector file is malformed or does not fit the model."""


class ModelError(RsLocalError):
    """A model could not be found, fetched, verified or loaded."""


class PromptSetError(FileProblem):
    """A prompt set is empty, has no usable column, or cannot be decoded."""


class PromptTooLong(RsLocalError):
    """A prompt that cannot fit the context with room to answer (the caller adds its file)."""
