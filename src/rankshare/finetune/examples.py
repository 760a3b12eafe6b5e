"""What one example is: a text with its label (classification), or a conversation to answer (instructions)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into its task's label names
    task: str  # "news", "sentiment", or the user's data name


@dataclass(frozen=True)
class Instruction:
    """An instruction-tuning example: a conversation whose last turn, the assistant's, is the answer to learn."""

    turns: tuple[tuple[str, str], ...]  # (role, content) pairs, the last one ("assistant", response)
    task: str

    @classmethod
    def of(cls, prompt: str, response: str, task: str) -> Instruction:
        return cls((("user", prompt), ("assistant", response)), task)

    @property
    def context(self) -> tuple[tuple[str, str], ...]:
        return self.turns[:-1]

    @property
    def prompt(self) -> str:
        """The turns before the answer as plain text, one per line (the plain layout's prompt)."""
        return "\n".join(content for _, content in self.context)

    @property
    def response(self) -> str:
        return self.turns[-1][1]
