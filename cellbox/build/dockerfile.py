"""What cellbox reads of a Dockerfile: its stages, each instruction's line, its base images.

Not an interpreter: buildah builds. cellbox reads the file only to name the line of a failing
step (buildah prints ``[stage/stages] STEP n/m: INSTRUCTION``) and to see which base images a
build needs before it starts (to bootstrap ``debian:<suite>`` or fail fast on an image that
cannot be had).

Buildah numbers the steps of each stage from 1: the ``FROM`` is step 1, every instruction after
it one step; ``ARG`` lines before the first ``FROM`` are not steps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Instruction", "Stage", "Dockerfile", "parse"]

_ARG_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-+][^}]*)?\}|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line of the instruction's first line in the file
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined with a space


@dataclass
class Stage:
    base: str  # the FROM image as written, ARGs resolved from their defaults
    name: str | None  # the AS name
    instructions: list[Instruction] = field(default_factory=list)  # the FROM first

    @property
    def steps(self) -> int:
        return len(self.instructions)


@dataclass
class Dockerfile:
    stages: list[Stage]

    @property
    def steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def base_images(self) -> list[str]:
        """External images the build needs, in order: FROM operands that are neither an earlier
        stage's name nor ``scratch``."""
        names: set[str] = set()
        out: list[str] = []
        for stage in self.stages:
            base = stage.base
            # ``FROM 0`` names an earlier stage by index
            if base.lower() != "scratch" and base not in names and not base.isdigit() and base not in out:
                out.append(base)
            if stage.name:
                names.add(stage.name)
        return out

    def instruction_at(self, stage: int, step: int) -> Instruction | None:
        """The instruction of ``step`` (1-based, as buildah prints it) in ``stage`` (1-based)."""
        if not 1 <= stage <= len(self.stages):
            return None
        instructions = self.stages[stage - 1].instructions
        return instructions[step - 1] if 1 <= step <= len(instructions) else None

    def offset(self, stage: int) -> int:
        """Steps in the stages before ``stage`` (1-based): buildah's per-stage step + this is the
        build's overall step."""
        return sum(s.steps for s in self.stages[: stage - 1])


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, joined text) per instruction; comments and blank lines dropped,
    ``\\`` continuations joined (comment lines inside a continuation are skipped, as Docker does)."""
    escape = "\\"
    lines = text.splitlines()
    # A parser directive on the first lines may change the escape character.
    for raw in lines:
        match = re.match(r"^#\s*escape\s*=\s*(\S)\s*$", raw, re.IGNORECASE)
        if match:
            escape = match.group(1)
            break
        if not re.match(r"^#\s*\w+\s*=", raw):
            break
    out: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if not current:
            start = number
        if raw.rstrip().endswith(escape):
            current.append(raw.rstrip()[:-1].strip())
            continue
        current.append(stripped)
        out.append((start, " ".join(part for part in current if part)))
        current = []
    if current:
        out.append((start, " ".join(part for part in current if part)))
    return out


def _substitute(value: str, args: dict[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return args.get(name, "")

    return _ARG_REF.sub(repl, value)


def parse(text: str, build_args: dict[str, str] | None = None) -> Dockerfile:
    """Split a Dockerfile into stages. ``build_args`` override ARG defaults (``--build-arg``)."""
    overrides = build_args or {}
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, content in _logical_lines(text):
        keyword, _, rest = content.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = _substitute(words[0], {**global_args, **overrides}) if words else ""
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=base, name=name, instructions=[Instruction(line, keyword, rest)]))
        elif not stages:
            if keyword == "ARG":
                key, _, default = rest.partition("=")
                global_args[key.strip()] = overrides.get(key.strip(), default.strip().strip("\"'"))
        else:
            stages[-1].instructions.append(Instruction(line, keyword, rest))
    return Dockerfile(stages)
