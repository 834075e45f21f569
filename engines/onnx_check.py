"""The static ONNX rule checker: ``check_onnx(model, target) -> findings``, its registry and its report.

TensorRT cannot be installed where pqcad-deploy is developed, so a graph TensorRT refuses (or builds
slowly) would first show on a user's Jetson. The checker states TensorRT's and ONNX Runtime's
documented Q/DQ limits as rules and runs anywhere with onnx and numpy: ``pqcad-deploy check`` prints
its findings, and ``build-engine --backend tensorrt`` refuses a graph with an error finding before
TensorRT is even imported. docs/CHECKER.md lists the rules and their sources.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import onnx_rules_int4, onnx_rules_model, onnx_rules_placement, onnx_rules_qdq
from .errors import EngineError
from .onnx_findings import CHECK_TARGETS, Finding, Rule

__all__ = ["OnnxCheckError", "RULES", "rules_for", "load_model", "check_onnx", "summary", "format_human",
           "format_json"]


class OnnxCheckError(EngineError):
    """The model to check is missing, unreadable or not ONNX, or the target is unknown."""


RULES: dict[str, Rule] = {
    rule.id: rule
    for rule in (*onnx_rules_model.RULES, *onnx_rules_qdq.RULES, *onnx_rules_int4.RULES, *onnx_rules_placement.RULES)
}
"""Every rule by id, in the order findings are reported: the ops a target cannot import and the
opset first (an ONNX exported for the wrong runtime stops there, with the fix), then each Q/DQ's
own values, 4-bit placement, and last the placement and precision warnings."""


def rules_for(target: str) -> list[Rule]:
    """The rules that apply to ``target``, in registry order.

    Raises:
        OnnxCheckError: ``target`` is not one of :data:`CHECK_TARGETS`.
    """
    if target not in CHECK_TARGETS:
        raise OnnxCheckError(f"target must be one of {', '.join(CHECK_TARGETS)}; got {target!r}.")
    return [rule for rule in RULES.values() if target in rule.targets]


def load_model(path: str | os.PathLike[str]) -> Any:
    """Read an ONNX file's graph (external weight files are not read; values stored there are skipped).

    Raises:
        OnnxCheckError: missing, unreadable or not ONNX; one sentence with the path.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise OnnxCheckError(f"{path} does not exist or is not a file; pass an ONNX model file.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError, ...
        raise OnnxCheckError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); pass the .onnx "
                             "file pqcad-deploy export wrote.") from exc
    if not model.graph.node:
        raise OnnxCheckError(f"{path} is not an ONNX model (no graph nodes); pass the .onnx file pqcad-deploy "
                             "export wrote.")
    return model


def check_onnx(model_or_path: Any, target: str) -> list[Finding]:
    """Check an ONNX model against every rule of ``target``.

    Args:
        model_or_path: a ModelProto, or the path of an ONNX file.
        target: ``tensorrt`` or ``onnxruntime`` (:data:`CHECK_TARGETS`).

    Returns:
        The findings, rule by rule in registry order, node by node in graph order within a rule.

    Raises:
        OnnxCheckError: unknown target; a missing, unreadable or non-ONNX file.
    """
    from .onnx_graph_view import GraphView  # imports onnx: only when a model is checked

    rules = rules_for(target)
    model = model_or_path if hasattr(model_or_path, "graph") else load_model(model_or_path)
    view = GraphView(model)
    findings = []
    for rule in rules:
        for node, message in rule.check(view, target):
            findings.append(Finding(rule=rule.id, severity=rule.severity, node=node, message=message,
                                    reference=rule.reference_for(target)))
    return findings


def summary(findings: list[Finding], target: str) -> dict[str, Any]:
    """Counts for the report: errors, warnings, rules checked, and findings per rule."""
    per_rule: dict[str, int] = {}
    for f in findings:
        per_rule[f.rule] = per_rule.get(f.rule, 0) + 1
    return {
        "target": target,
        "errors": sum(f.severity == "error" for f in findings),
        "warnings": sum(f.severity == "warning" for f in findings),
        "rules_checked": len(rules_for(target)),
        "findings_per_rule": per_rule,
    }


def format_human(findings: list[Finding], target: str, source: str) -> str:
    """One line per finding (``rule-id severity node: message (see URL)``) and a summary line."""
    s = summary(findings, target)
    lines = [f.line() for f in findings]
    lines.append(f"{source}: {s['errors']} error(s), {s['warnings']} warning(s) ({s['rules_checked']} {target} "
                 "rules checked).")
    return "\n".join(lines)


def format_json(findings: list[Finding], target: str, source: str) -> str:
    """``{"model", "findings": [...], "summary": {...}}`` as indented JSON."""
    return json.dumps({"model": source, "findings": [f.to_dict() for f in findings],
                       "summary": summary(findings, target)}, indent=2)
