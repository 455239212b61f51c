"""Every vLLM internal UMIM relies on is listed once (``vllm_umim.engine.internals``), pinned to
vLLM 0.32.0, and documented (``docs/vllm-internals.md``, generated from the list)."""

from __future__ import annotations

import dataclasses

import pytest

from vllm_umim.engine import internals
from vllm_umim.engine.internals import FIELD, INTERNALS, OPEN, OVERRIDE, PRESENT, SIGNATURE, SOURCE, VALUE, WRAP, Internal, problems

RAY_MODULES = ("vllm.v1.executor.ray_executor_v2", "vllm.v1.executor.ray_utils")


@pytest.fixture(scope="module", autouse=True)
def wrappers_installed():
    """Pins read through UMIM's wrappers to the vLLM methods they wrap, as in a running engine."""
    from vllm_umim.server.patches import apply_patches

    apply_patches()


def test_items_are_unique():
    items = [row.item for row in INTERNALS]
    assert len(items) == len(set(items)), sorted(i for i in items if items.count(i) > 1)


@pytest.mark.parametrize("row", INTERNALS, ids=lambda row: row.item)
def test_pin(row):
    if row.module in RAY_MODULES:
        pytest.importorskip("ray")
    assert problems(row) == []


def test_doc_is_the_inventory():
    """docs/vllm-internals.md holds exactly the list rendered against the installed vLLM."""
    pytest.importorskip("ray")
    section = internals.doc_section(internals.DOC.read_text())
    assert section == internals.render(), "docs/vllm-internals.md is stale: python -m vllm_umim.engine.internals --write"


def test_doc_check_fails_when_the_list_changes(monkeypatch):
    pytest.importorskip("ray")
    title, rows = internals.SECTIONS[0]
    changed = [dataclasses.replace(rows[0], why="something else"), *rows[1:]]
    monkeypatch.setattr(internals, "SECTIONS", [(title, changed), *internals.SECTIONS[1:]])
    assert internals.doc_section(internals.DOC.read_text()) != internals.render()


def test_every_wrapper_is_listed():
    from vllm_umim.engine.patches import PATCHED as ENGINE_PATCHED, unwrapped
    from vllm_umim.server.patches import PATCHED as SERVER_PATCHED

    patched = ENGINE_PATCHED + SERVER_PATCHED
    assert unwrapped(patched) == []
    wrapped = {(owner.__module__, f"{owner.__name__}.{name}") for owner, name, _ in patched}
    listed = {(row.module, row.item) for row in INTERNALS if row.kind == WRAP}
    assert wrapped == listed


def umim_subclasses_of_vllm() -> list[type]:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_umim.engine import worker
    from vllm_umim.engine.model_runner import UmimModelRunnerMixin, UmimRequestState
    from vllm_umim.engine.patches import RequestChoiceError
    from vllm_umim.engine.scheduler import UmimScheduler

    classes = [UmimScheduler, worker.UmimCPUModelRunner, type("GPURunner", (UmimModelRunnerMixin, GPUModelRunner), {}),
               UmimRequestState, worker.UmimCPUWorker, worker.UmimGPUWorker, RequestChoiceError]
    try:
        from vllm_umim.engine.ray_executor import UmimCpuRayExecutor, UmimCpuRayWorkerProc
    except ImportError:  # no ray
        return classes
    return classes + [UmimCpuRayExecutor, UmimCpuRayWorkerProc]


def overridden(cls: type) -> set[tuple[str, str]]:
    """(vLLM module, "VllmClass.name") for each name a UMIM class in ``cls``' MRO defines over vLLM's."""
    found = set()
    ours = [k for k in cls.__mro__ if not k.__module__.startswith("vllm.") and k.__module__ != "builtins"]
    for klass in ours:
        for name in vars(klass):
            if (name.startswith("__") and name != "__init__") or name == "_abc_impl":  # class machinery
                continue
            definer = next((k for k in cls.__mro__ if k.__module__.startswith("vllm.") and name in vars(k)), None)
            if definer is not None:
                found.add((definer.__module__, f"{definer.__name__}.{name}"))
    return found


def test_every_override_is_listed():
    """A method or attribute a UMIM subclass defines over vLLM's own is in the list (a new one
    fails here until it is)."""
    listed = {(row.module, row.item) for row in INTERNALS if row.kind == OVERRIDE}
    for cls in umim_subclasses_of_vllm():
        assert overridden(cls) <= listed, (cls.__name__, overridden(cls) - listed)


# ---- the checks fail loudly, naming the item --------------------------------------------------
class Planted:
    """Stands in for a vLLM class in the tests below."""

    size: int = 3

    def method(self, a, *, b=1):
        self.token_ids = [a, b]


def planted(pin: str, expected: str = "", item: str = "Planted.method", **kwargs) -> Internal:
    return Internal(item, __name__, OVERRIDE, pin, expected, "engine/x.py", "the reason", **kwargs)


def test_a_changed_signature_source_field_or_value_fails_naming_the_item():
    assert problems(planted(SIGNATURE, "(self, a, *, b=...)")) == []
    assert problems(planted(SIGNATURE, "(self, a, b=...)")) == [
        "Planted.method: signature is '(self, a, *, b=...)', UMIM is written against '(self, a, b=...)' "
        "(re-check: the reason)"]
    current = internals.actual(planted(SOURCE))
    assert len(current) == 12 and problems(planted(SOURCE, current)) == []
    assert problems(planted(SOURCE, "000000000000"))[0].startswith("Planted.method: source sha256 is")
    assert problems(planted(FIELD, "int", item="Planted.size")) == []
    assert problems(planted(FIELD, "str", item="Planted.size"))[0].startswith("Planted.size: field annotation is 'int'")
    assert problems(planted(VALUE, "4", item="Planted.size"))[0].startswith("Planted.size: value is '3'")
    assert problems(planted(OPEN, item="Planted")) == []


def test_a_missing_line_or_item_fails_naming_it():
    assert problems(planted(PRESENT, needles=("self.token_ids = [a, b]",))) == []
    assert problems(planted(PRESENT, needles=("self._token_ids = [a, b]",))) == [
        "Planted.method: 'self._token_ids = [a, b]' is no longer in Planted.method"]
    assert problems(planted(SIGNATURE, "(self)", item="Planted.gone")) == [
        "Planted.gone: cannot be found in vLLM (AttributeError: gone)"]


def test_the_command_line_reports_every_item_as_pinned(capsys):
    pytest.importorskip("ray")
    assert internals.main([]) == 0
    assert capsys.readouterr().out.strip() == f"all {len(INTERNALS)} vLLM internals as pinned (0.32.0)"


def test_an_unlisted_override_fails():
    from vllm_umim.engine.scheduler import UmimScheduler

    planted_scheduler = type("PlantedScheduler", (UmimScheduler,), {"_preempt_request": lambda self, *args: None})
    listed = {(row.module, row.item) for row in INTERNALS if row.kind == OVERRIDE}
    assert overridden(planted_scheduler) - listed == {("vllm.v1.core.sched.scheduler", "Scheduler._preempt_request")}
