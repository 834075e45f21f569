"""What the static ONNX checker reports: targets, severities, a rule's record and one finding.

Kept free of onnx and numpy so ``cli.py`` can read :data:`CHECK_TARGETS` for ``check --target``
without loading anything heavy; the rules live in ``onnx_rules_*`` and the runner in
:mod:`.onnx_check`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:  # the graph index imports onnx; rules receive it, this module never builds one
    from .onnx_graph_view import GraphView

__all__ = ["CheckTarget", "CHECK_TARGETS", "Severity", "SEVERITIES", "Hit", "Finding", "Rule", "RuleFunction"]

CheckTarget = Literal["tensorrt", "onnxruntime"]
CHECK_TARGETS: tuple[str, ...] = get_args(CheckTarget)
"""The runtimes a graph is checked for: the engine backends of ``build-engine``."""

Severity = Literal["error", "warning"]
SEVERITIES: tuple[str, ...] = get_args(Severity)
"""error: the target refuses the graph or computes something else; warning: it builds but loses the
speed the Q/DQ graph was written for (a fusion defeated, float compute left in)."""

Hit = tuple[str, str]
"""What a rule function yields: (node or tensor name, message). The runner adds the rule's id,
severity and reference, so a rule cannot report under another rule's name."""

RuleFunction = Callable[["GraphView", str], Iterable[Hit]]


@dataclass(frozen=True)
class Finding:
    """One broken rule at one place of the graph.

    Attributes:
        rule: the rule id (a key of ``onnx_check.RULES``).
        severity: ``error`` or ``warning`` (:data:`SEVERITIES`).
        node: the node (or graph input, or ``<model>``) the finding is about.
        message: one sentence: what is wrong and what to do.
        reference: the documentation that states the rule.
    """

    rule: str
    severity: Severity
    node: str
    message: str
    reference: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """``rule-id severity node: message (see URL)``, the human output's line."""
        return f"{self.rule} {self.severity} {self.node}: {self.message} (see {self.reference})"


@dataclass(frozen=True)
class Rule:
    """One rule of the registry.

    Attributes:
        id: kebab-case id, printed with every finding and listed in docs/CHECKER.md.
        title: what the rule catches, in a few words (docs/CHECKER.md's table).
        targets: the check targets it applies to (a subset of :data:`CHECK_TARGETS`).
        severity: what a finding of it is.
        reference: the documentation section that states the constraint.
        check: ``(graph view, target) -> (node, message) pairs``.
        target_references: ``(target, url)`` pairs where one target's own documentation states the
            rule better than ``reference`` (an ONNX Runtime finding should not send its reader to
            TensorRT's manual).
    """

    id: str
    title: str
    targets: tuple[str, ...]
    severity: Severity
    reference: str
    check: RuleFunction
    target_references: tuple[tuple[str, str], ...] = ()

    def reference_for(self, target: str) -> str:
        """The document a finding for ``target`` cites."""
        return dict(self.target_references).get(target, self.reference)

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in CHECK_TARGETS]
        if not self.targets or unknown:
            raise ValueError(f"rule {self.id}: targets must be a non-empty subset of {CHECK_TARGETS}, got {self.targets}")
        if any(t not in self.targets for t, _ in self.target_references):
            raise ValueError(f"rule {self.id}: target_references name targets it does not apply to")
        if self.severity not in SEVERITIES:
            raise ValueError(f"rule {self.id}: severity must be one of {SEVERITIES}, got {self.severity!r}")
