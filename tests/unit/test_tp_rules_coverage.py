"""Every registered TP sharding rule has a property test: each op name of ``RULES`` (the pointwise
names among them) is declared by a test of ``test_tp_rules.py`` or ``test_tp_rules_pointwise.py``
with ``covers(...)``, and conftest fails a test that declared an op it did not check. A new rule
without a test fails here, naming it."""

from __future__ import annotations

from types import ModuleType

from autopart.passes.tp.rules import POINTWISE, RULES
from tests.unit import test_tp_rules, test_tp_rules_pointwise


def _declared(module: ModuleType) -> set[str]:
    """The op names the tests of ``module`` declare with ``covers``, on the test or on one of its
    ``pytest.param`` cases."""
    names: set[str] = set()
    for name, test in vars(module).items():
        if not name.startswith("test_"):
            continue
        for mark in getattr(test, "pytestmark", []):
            if mark.name == "covers":
                names.update(mark.args)
            elif mark.name == "parametrize":
                for value in mark.args[1]:
                    names.update(
                        n for m in getattr(value, "marks", ()) if m.name == "covers" for n in m.args
                    )
    return names


DECLARED = _declared(test_tp_rules) | _declared(test_tp_rules_pointwise)


def test_every_rule_has_a_property_test() -> None:
    untested = sorted(set(RULES) - DECLARED)
    assert not untested, (
        f"{len(untested)} TP rules without a property test: {untested}; add one to "
        "tests/unit/test_tp_rules*.py that checks the op (check(node, d)) and is marked covers(op)"
    )


def test_every_pointwise_name_is_a_rule_with_a_test() -> None:
    assert POINTWISE.issubset(RULES)
    untested = sorted(POINTWISE - DECLARED)
    assert not untested, f"pointwise ops without a property test: {untested}"


def test_tests_declare_only_registered_rules() -> None:
    """A declared name with no rule is a misspelling (or a rule removed under its test)."""
    unknown = sorted(DECLARED - set(RULES))
    assert not unknown, f"covers(...) names ops that have no TP rule: {unknown}"
