"""``combine_axes: pairwise`` (pipeline_lib.plan.pairwise): every two values of any two axes meet
in a variant the pipeline can run, unless no such variant exists; no variant is one the
pipeline's rules refuse; and the same config gives the same variants in every process and on
every machine."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import subprocess
import sys

import pytest

from pipeline_lib.plan import axes, config, expectations, grid
from pipeline_lib.plan.axes import Rule, UndeclaredAxis, Variant
from tests.conftest import REPO

SHIPPED = REPO / "configs" / "every_axis_pairwise.yaml"
# The shipped grid's variants (their ids in order): a change of covertable, of its options or
# of the rules changes the cells the config runs, and the cells a measured grid of it holds.
SHIPPED_VARIANTS = (41, "131024dd72ceecea")


def pairs(variant: Variant, names: list[str]) -> set[tuple]:
    value = variant.to_dict()
    return {(a, value[a], b, value[b]) for a, b in itertools.combinations(names, 2)}


def uncovered(values: dict[str, list[str]], made: list[Variant]) -> set[tuple]:
    """The pairs of values that some runnable variant of the product holds and no made one does.
    A pair no made variant holds is searched for in the product: over the axes the rules read
    (the others cannot make a variant conflict: each rule reads only the axes it declares)."""
    names = list(values)
    held = set().union(*(pairs(v, names) for v in made))
    candidates = {
        (a, x, b, y)
        for a, b in itertools.combinations(names, 2)
        for x in values[a]
        for y in values[b]
    } - held
    read = {axis for rule in axes.RULES for axis in rule.reads}

    def possible(a: str, x: str, b: str, y: str) -> bool:
        others = [n for n in names if n in read and n not in (a, b)]
        base = {n: values[n][0] for n in names} | {a: x, b: y}
        return any(
            axes.conflict(Variant(**base | dict(zip(others, combo, strict=True)))) is None
            for combo in itertools.product(*(values[n] for n in others))
        )

    return {pair for pair in candidates if possible(*pair)}


def ids(cfg: dict) -> list[str]:
    return [v.id for v in axes.variants(cfg)]


def digest(variant_ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(variant_ids).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def shipped() -> dict:
    return config.load(SHIPPED)


def test_the_shipped_grid_covers_every_pair_it_can(shipped):
    made = axes.variants(shipped)
    values = axes.axis_values(shipped)
    assert uncovered(values, made) == set()
    assert [v for v in made if axes.conflict(v)] == []
    product = math.prod(len(v) for v in values.values())
    one_at_a_time = axes.variants({**shipped, "combine_axes": "one_at_a_time"})
    assert (len(made), len(one_at_a_time), product) == (41, 17, 1500)


def test_every_value_of_every_axis_is_covered_too(small_config):
    # engine: pairwise covers engine dcp only (the config refuses another, tests/test_engines.py)
    every = {axis: list(values) for axis, values in axes.AXES.items() if axis != "engine"}
    cfg = config.validate({**small_config, **every, "combine_axes": "pairwise"})
    made = axes.variants(cfg)
    assert uncovered(axes.axis_values(cfg), made) == set()
    assert [v for v in made if axes.conflict(v)] == [] and len(made) == 121


def test_the_check_sees_a_pair_no_variant_holds(shipped):
    made = axes.variants(shipped)
    (full_meta,) = [v for v in made if (v.mode, v.load_init) == ("full", "meta")]
    missing = uncovered(axes.axis_values(shipped), [v for v in made if v != full_meta])
    assert ("mode", "full", "load_init", "meta") in missing


def test_a_pair_no_variant_can_hold_is_in_none(small_config):
    """mode full with format safetensors is refused by a rule: pairwise leaves it out, where the
    product makes it a skip with the reason."""
    cfg = {**small_config, "mode": ["sharded", "full"], "format": ["dcp", "safetensors"]}
    made = axes.variants(config.validate({**cfg, "combine_axes": "pairwise"}))
    assert {(v.mode, v.format) for v in made} == {
        ("sharded", "dcp"), ("sharded", "safetensors"), ("full", "dcp"),
    }  # fmt: skip
    product = axes.variants(config.validate({**cfg, "combine_axes": "product"}))
    assert axes.conflict(Variant(mode="full", format="safetensors")) in map(axes.conflict, product)


def test_a_grid_of_impossible_pairs_only_is_refused(small_config):
    cfg = {**small_config, "mode": ["full"], "format": ["safetensors"], "combine_axes": "pairwise"}
    with pytest.raises(config.ConfigError) as err:
        config.validate(cfg)
    assert config.error_lines(err.value) == [
        "config: combine_axes: pairwise: no combination of the axes' values can run"
    ]


def test_a_rule_reading_an_axis_it_does_not_declare_raises():
    """Pairwise checks a rule on the axes it declares only: one that reads another is caught
    the first time it runs, not left to give a wrong answer."""
    sloppy = Rule(("mode",), lambda v: "no" if v.format != "dcp" else None)
    with pytest.raises(UndeclaredAxis, match="reads axis format"):
        sloppy.allows({"mode": "full"})
    for rule in axes.RULES:  # the shipped rules, on every combination of their own axes
        for combo in itertools.product(*(axes.AXES[a] for a in rule.reads)):
            rule.allows(dict(zip(rule.reads, combo, strict=True)))


def test_the_variants_are_the_same_in_every_process(shipped):
    """No salted hash decides them: two processes with other PYTHONHASHSEEDs give the ids this
    one does, and they are the ones pinned here (another machine or a covertable release that
    changed them would fail this)."""
    here = ids(shipped)
    assert (len(here), digest(here)) == SHIPPED_VARIANTS
    code = (
        "import json; from pipeline_lib.plan import axes, config; "
        f"print(json.dumps([v.id for v in axes.variants(config.load({str(SHIPPED)!r}))]))"
    )
    for seed in ("1", "2"):
        env = {"PYTHONHASHSEED": seed, "PATH": ""}
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        assert json.loads(out) == here


def test_a_measured_grid_holds_the_variants_the_config_runs(shipped):
    entry = {"run": "r", **{k: shipped[k] for k in ("models", "layouts", "pairs")}}
    entry |= {axis: shipped[axis] for axis in axes.AXES} | {"combine_axes": "pairwise"}
    measured = expectations.MeasuredGrid.parse(entry, "g")
    assert measured.variants == frozenset(axes.variants(shipped))
    assert measured.size == len(grid.cells(shipped)) == 10496
