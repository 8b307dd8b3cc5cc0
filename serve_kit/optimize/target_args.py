"""Target settings on the command line, Olive/Optimum style:

    -t onnx-int8-static:calibration_method=entropy,diagnose=false
    -t onnx-int8-dynamic:op_types=MatMul+Gemm          (or op_types=["MatMul","Gemm"])
    -t onnx-int8-static:gate.max_flip_rate=0.02,gate.kinds.prob=probability

Values are typed by the target's own Config (the pydantic model a recipe's `config:` is validated
with), so the command line and a recipe accept exactly the same settings; `gate.` keys set that
target's accuracy gate. Settings are merged over the recipe's entry for the same target.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..config import GateConfig, TargetSpec, model_errors, type_words, gate_setting, setting_value, split_settings
from ..errors import UsageError
from .target import target_class


def _valid_keys(config_cls) -> str:
    keys = [f"{k} ({type_words(f.annotation)})" for k, f in config_cls.model_fields.items()]
    return (", ".join(keys) or "(this target has no settings)") + "; and gate.FIELD=VALUE for its gate"


def parse_target_arg(text: str, base: TargetSpec | None = None, origin: str = "--target") -> TargetSpec:
    """`NAME[:KEY=VALUE,...]` -> a TargetSpec whose config and gate are `base`'s (the recipe's entry
    for that target, if any) with these settings over them. Raises UsageError naming the bad key or
    value and listing the valid keys."""
    name, _, rest = text.partition(":")
    name = name.strip()
    cls = target_class(name)  # an unknown name is a UsageError listing the targets
    where = f"{origin} {text}"
    if base is not None and base.name != name:
        base = None
    config: dict[str, Any] = dict(base.config) if base else {}
    gate_fields: dict[str, Any] = {}
    given: set[str] = set()
    for item in split_settings(rest):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError("a target setting is not KEY=VALUE", value=item, origin=where,
                             hint=f"e.g. -t onnx-int8-static:calibration_method=entropy,diagnose=false; "
                                  f"{name} settings: {_valid_keys(cls.Config)}")
        if key in given:
            raise UsageError(f"target setting {key!r} given twice", value=item, origin=where)
        given.add(key)
        if key.startswith("gate."):
            gate_setting(gate_fields, key[len("gate."):], value, where, "gate.FIELD=VALUE")
            continue
        if key not in cls.Config.model_fields:
            raise UsageError(f"{name} has no setting {key!r}", value=item, origin=where,
                             hint=f"{name} settings: {_valid_keys(cls.Config)}")
        config[key] = setting_value(cls.Config, key, value)
    try:
        checked = cls.Config(**config)
    except ValidationError as e:
        raise UsageError(f"invalid {name} settings: {model_errors(e)}", value=rest or None, origin=where,
                         hint=f"{name} settings: {_valid_keys(cls.Config)}") from None
    # Keep what was written (not the defaults filled in), as a recipe's `config:` would be.
    typed = checked.model_dump(include=set(config))
    gate = base.gate if base else None
    if gate_fields:
        gate = (gate or GateConfig()).merged(GateConfig(**gate_fields))
    return TargetSpec(name=name, config=typed, gate=gate)


def parse_target_args(items: list[str], recipe_targets: list[TargetSpec] | None = None,
                      origin: str = "--target") -> list[TargetSpec]:
    """Every `-t` item, each merged over the recipe's entry of that name; a target given twice is
    refused (its variants would share a name in the report and the repository)."""
    by_name = {t.name: t for t in (recipe_targets or [])}
    specs: list[TargetSpec] = []
    for item in items:
        name = item.partition(":")[0].strip()
        if any(s.name == name for s in specs):
            raise UsageError(f"target {name!r} given twice", value=item, origin=origin,
                             hint="give each target once, with all its settings: -t NAME:KEY=VALUE,KEY=VALUE")
        specs.append(parse_target_arg(item, by_name.get(name), origin))
    return specs
