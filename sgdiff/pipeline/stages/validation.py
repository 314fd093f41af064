from __future__ import annotations

from collections.abc import Callable, Sequence

from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.sampling import FamilyParams

ValidationRule = Callable[[FamilyParams], None]  # raises UserError


class InputValidationStage(Stage):
    """Generic checks plus the model's own rules, before any tensor work."""

    name = "input_validation"
    parallel = ParallelMode.ALL_RANKS

    def __init__(self, rules: Sequence[ValidationRule] = ()):
        self.rules = list(rules)

    def run(self, state: State) -> None:
        state.params.validate()
        for rule in self.rules:
            rule(state.params)
