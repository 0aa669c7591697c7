"""LR policies: pure, deterministic, exact against ``torch.optim.lr_scheduler``.

    from lrpilot.policies import parse_policy
    policy = parse_policy({"kind": "plateau", "metric": "val_loss"}).build([0.1])
    lrs = policy.step({"val_loss": 0.3})

Each kind lives in its own module, with its spec (pydantic, torch's field
names and defaults) and its policy object (``step``, ``state_dict``,
``load_state_dict``). See docs/policies.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from .base import (
    NO_METRICS,
    Decision,
    Gauge,
    Policy,
    PolicySpec,
    ScheduleExhausted,
    SpecError,
    Trip,
)
from .cosine import CosinePolicy, CosineSpec
from .cosine_restarts import CosineRestartsPolicy, CosineRestartsSpec
from .cyclic import CyclicPolicy, CyclicSpec
from .exponential import ExponentialPolicy, ExponentialSpec
from .guard import GuardPolicy, GuardSpec
from .linear import LinearPolicy, LinearSpec
from .multistep import MultiStepPolicy, MultiStepSpec
from .onecycle import OneCyclePolicy, OneCycleSpec
from .plateau import PlateauPolicy, PlateauSpec
from .range_test import RangeTestPolicy, RangeTestSpec
from .sequential import STAGE_SPECS, SequentialPolicy, SequentialSpec
from .step import StepPolicy, StepSpec

__all__ = [
    "KINDS",
    "NO_METRICS",
    "POLICY_GAUGES",
    "AnyPolicySpec",
    "CosinePolicy",
    "CosineRestartsPolicy",
    "CosineRestartsSpec",
    "CosineSpec",
    "CyclicPolicy",
    "CyclicSpec",
    "Decision",
    "ExponentialPolicy",
    "ExponentialSpec",
    "Gauge",
    "GuardPolicy",
    "GuardSpec",
    "LinearPolicy",
    "LinearSpec",
    "MultiStepPolicy",
    "MultiStepSpec",
    "OneCyclePolicy",
    "OneCycleSpec",
    "PlateauPolicy",
    "PlateauSpec",
    "Policy",
    "PolicySpec",
    "RangeTestPolicy",
    "RangeTestSpec",
    "ScheduleExhausted",
    "SequentialPolicy",
    "SequentialSpec",
    "SpecError",
    "StepPolicy",
    "StepSpec",
    "Trip",
    "parse_policy",
]

_SPECS: tuple[type[PolicySpec], ...] = (*STAGE_SPECS, SequentialSpec, RangeTestSpec, GuardSpec)
KINDS: tuple[str, ...] = tuple(spec.model_fields["kind"].default for spec in _SPECS)
if TYPE_CHECKING:  # mypy cannot read a Union built from a tuple at runtime
    AnyPolicySpec = PolicySpec
else:
    AnyPolicySpec = Annotated[Union[_SPECS], Field(discriminator="kind")]  # noqa: UP007
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyPolicySpec)

_POLICIES: tuple[tuple[str, type[Policy]], ...] = (
    ("step", StepPolicy),
    ("multistep", MultiStepPolicy),
    ("exponential", ExponentialPolicy),
    ("cosine", CosinePolicy),
    ("cosine_restarts", CosineRestartsPolicy),
    ("cyclic", CyclicPolicy),
    ("onecycle", OneCyclePolicy),
    ("linear", LinearPolicy),
    ("plateau", PlateauPolicy),
    ("sequential", SequentialPolicy),
    ("range_test", RangeTestPolicy),
    ("guard", GuardPolicy),
)


def _policy_gauges() -> tuple[Gauge, ...]:
    """Every gauge some policy exports, once, its help naming the kinds that
    export it: the exporter's policy families, in a stable order."""
    by_name: dict[str, tuple[Gauge, list[str]]] = {}
    for kind, cls in _POLICIES:
        for gauge in cls.GAUGES:
            first, kinds = by_name.setdefault(gauge.name, (gauge, []))
            if first.kind != gauge.kind:
                raise TypeError(f"gauge {gauge.name} is a {first.kind} and a {gauge.kind}")
            kinds.append(kind)
    return tuple(
        Gauge(g.name, g.kind, f"{' / '.join(kinds)}: {g.help}") for g, kinds in by_name.values()
    )


POLICY_GAUGES: tuple[Gauge, ...] = _policy_gauges()


def parse_policy(obj: Any) -> PolicySpec:
    """Validate a policy spec (a dict, as from JSON) and return its model.

    Raises :class:`SpecError` with one line naming each wrong field and rule.
    """
    if isinstance(obj, PolicySpec):
        return obj
    if not isinstance(obj, dict):
        raise SpecError(f"policy: expected a JSON object with a 'kind', got {type(obj).__name__}")
    try:
        return _ADAPTER.validate_python(_lists(obj))
    except ValidationError as exc:
        raise SpecError(describe(exc)) from None


def _lists(value: Any) -> Any:
    """Tuples to lists, so Python callers may write milestones=(30, 60)."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def describe(exc: ValidationError, whole: str = "policy") -> str:
    """One line for a pydantic error: ``field: rule (got value)`` joined by
    ``; ``. ``whole`` names what a rule of the whole model is about (empty:
    the rule's text alone, which names its flags itself)."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        kind_tag = err["type"] in ("union_tag_invalid", "union_tag_not_found")
        if kind_tag:
            where = ".".join([*loc, "kind"]) if loc else "kind"
            got = err.get("ctx", {}).get("tag")
            if got == "sequential" and loc:
                parts.append(f"{'.'.join(loc)}: a sequential stage cannot itself be sequential")
                continue
            if got == "range_test" and loc:
                parts.append(f"{'.'.join(loc)}: a range_test cannot be inside another policy")
                continue
            if got == "guard" and loc:
                parts.append(
                    f"{'.'.join(loc)}: a guard cannot be inside another policy "
                    "(but a range_test's then may be one)"
                )
                continue
            rule = "missing" if got is None else f"unknown policy kind {got!r}"
            parts.append(f"{where}: {rule} (expected one of {', '.join(KINDS)})")
            continue
        # loc starts with the union tag (the kind); keep it, it reads as kind.field.
        where = ".".join(loc) or whole
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] != "missing" and "input" in err and not isinstance(err["input"], dict):
            got = repr(err["input"])
            msg = msg if got in msg else f"{msg} (got {got})"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)
