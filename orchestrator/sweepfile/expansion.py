"""Expansion of a sweep's `parameters` into trials: grid products where conditions (`when`) hold, seeded
random draws, and the order in which conditions must be decided.

The parameters are `orchestrator.sweepfile.sections.Parameter` objects (anything with `when`, `choices`,
`distribution`, `min` and `max`).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from orchestrator.sweepfile.params import REPLICATE_PARAMS, coerce


def holds(when: dict[str, list[Any]] | None, chosen: dict[str, Any]) -> bool:
    return all(name in chosen and chosen[name] in allowed for name, allowed in (when or {}).items())


def replicates_last(order: list[str], parameters: Mapping[str, Any]) -> list[str]:
    """Replicate keys (seed) expand innermost, wherever the file lists them, so that the seeds of one
    configuration are consecutive trials: they start together and per-configuration ASHA decides early.
    A seed that a condition refers to keeps its place (the condition needs it first)."""
    needed = {dep for p in parameters.values() for dep in (p.when or {})}
    last = [k for k in order if k in REPLICATE_PARAMS and k not in needed]
    return [k for k in order if k not in last] + last


def dependency_order(parameters: Mapping[str, Any]) -> list[str]:
    """File order, except that a parameter comes after those its `when` refers to.

    Raises Cycle(name) when conditions refer to each other in a loop.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise Cycle(name)
        visiting.add(name)
        for dep in parameters[name].when or {}:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in parameters:
        visit(name)
    return order


class Cycle(Exception):
    pass


def expand(parameters: Mapping[str, Any], order: list[str]) -> list[dict[str, Any]]:
    """Grid expansion of categorical parameters; a conditional one only multiplies where it holds."""
    combos: list[dict[str, Any]] = [{}]
    for name in order:
        spec = parameters[name]
        expanded = []
        for combo in combos:
            if holds(spec.when, combo):
                expanded.extend({**combo, name: copy.deepcopy(v)} for v in spec.choices)
            else:
                expanded.append(combo)
        combos = expanded
    return combos



def sample(parameters: Mapping[str, Any], order: list[str], rng: np.random.Generator) -> dict[str, Any]:
    """One random draw: each parameter whose condition holds, from its values or its distribution."""
    chosen: dict[str, Any] = {}
    for name in order:
        spec = parameters[name]
        if not holds(spec.when, chosen):
            continue
        if spec.distribution is None:
            choices = spec.choices
            chosen[name] = copy.deepcopy(choices[int(rng.integers(len(choices)))])
        elif spec.distribution == "int_uniform":
            chosen[name] = coerce(name, int(rng.integers(int(spec.min), int(spec.max), endpoint=True)))
        elif spec.distribution == "log_uniform":
            x = math.exp(rng.uniform(math.log(spec.min), math.log(spec.max)))
            chosen[name] = coerce(name, min(max(x, spec.min), spec.max))  # exp() may round past a bound
        else:
            chosen[name] = coerce(name, float(rng.uniform(spec.min, spec.max)))
    return chosen
