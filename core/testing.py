"""The conformance suite every domain adapter runs (built-in and third-party alike).

Use it in an adapter's own tests::

    from sciscope.core.testing import check_adapter
    def test_my_adapter(tmp_path):
        check_adapter(MyAdapter({"n_examples": 16}), tmp_path)

Each check raises :class:`AssertionError` with a message that names what the adapter got wrong.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from .adapter import DomainAdapter, Examples
from .capture import POOLINGS, collect
from .config import STAGE_ORDER
from .context import RunContext
from .errors import ConfigError
from .experiment import core_analyses
from .fidelity import fidelity
from .sites import resolve_site


class _CheckContext(RunContext):
    """An in-memory context whose model is the one under check.

    A plain context builds its model from the run config (``config["model"]``, which an adapter's
    own ``model`` key overrides), so with ``check_adapter(spec=...)`` the task loss and the
    analyses would be built around another model than the one checked (and might train the default
    model first). This one hands out exactly the checked model.
    """

    def __init__(self, adapter: DomainAdapter, model: nn.Module, base: RunContext) -> None:
        super().__init__(adapter, base.config, trainer_options=base.trainer_options, progress=base.progress)
        self._checked = model

    def model(self, variant: str | None = None) -> nn.Module:
        return self._checked if variant is None else super().model(variant)


def check_adapter(adapter: DomainAdapter, tmp_path: str | Path, *, max_examples: int = 8, spec: str | None = None) -> dict:
    """Run the adapter contract end to end on a few examples; return what was checked.

    Checks: class metadata; config validation rejects an unknown key; ``examples("train")``
    returns :class:`Examples` with concepts present in obs; the model is an ``nn.Module``; every
    default site and alias resolves; capture over the first ``max_examples`` examples gives one
    finite row per example; every contrast selects rows on both sides; analyses have unique names
    and known stages, and those declared after ``examples`` run in memory and return rows; the
    task loss (if any) is finite and unchanged when the site's own activations are spliced back.

    Parameters
    ----------
    adapter
        The adapter under check.
    tmp_path
        A folder for the capture store.
    max_examples
        Examples captured.
    spec
        The model to check (``adapter.model(spec)``; None: the default). Every check uses it:
        capture runs it, and the analyses and the task loss get it as ``ctx.model()``.

    Returns
    -------
    dict
        ``n_examples``, ``sites``, ``store_rows``, ``analyses``, ``analyses_run``, ``task_loss``.
    """
    cls = type(adapter)
    assert isinstance(cls.name, str) and cls.name, f"{cls.__name__}.name must be a non-empty string"
    assert cls.description, f"{cls.__name__}.description must say what the domain is"
    assert isinstance(cls.default_config, dict), f"{cls.__name__}.default_config must be a dict"
    try:
        cls.validate_config({"__no_such_key__": 1})
    except ConfigError as e:
        assert "__no_such_key__" in str(e), f"{cls.__name__}: config error does not name the key: {e}"
    else:
        raise AssertionError(f"{cls.__name__}: an unknown config key was accepted")

    examples = adapter.examples("train")
    assert isinstance(examples, Examples), f"{cls.__name__}.examples() must return Examples, got {type(examples).__name__}"
    assert len(examples) > 0, f"{cls.__name__}.examples('train') is empty"
    assert isinstance(examples.obs, pd.DataFrame)
    for concept in adapter.concepts:
        assert concept in examples.obs.columns, f"{cls.__name__}: concept {concept!r} is not an obs column"

    model = adapter.model(spec)
    assert isinstance(model, nn.Module), f"{cls.__name__}.model() must return an nn.Module"
    sites = adapter.sites
    assert sites, f"{cls.__name__}.sites is empty"
    for site in sites:
        resolve_site(model, site, adapter.aliases)
    assert adapter.pooling in POOLINGS, f"{cls.__name__}.pooling {adapter.pooling!r} not in {POOLINGS}"

    n = min(max_examples, len(examples))
    subset = Examples(examples.obs.iloc[:n].reset_index(drop=True), _head(examples.inputs, n), examples.concepts)
    batches = list(itertools.islice(adapter.batches(subset, model, batch_size=4), 10_000))
    store = collect(
        model, batches, sites, out=Path(tmp_path) / f"{cls.name}-conformance", obs=subset.obs,
        pooling=adapter.pooling, aliases=adapter.aliases, progress=False,
    )
    if adapter.pooling != "none":
        assert store.n_obs == n, f"{cls.__name__}: capture gave {store.n_obs} rows for {n} examples"
    for site in sites:
        assert np.isfinite(store.array(site)).all(), f"{cls.__name__}: non-finite activations at {site!r}"

    full = pd.concat([examples.obs], ignore_index=True)
    for name, (a, b) in adapter.contrasts.items():
        for label, q in (("a", a), ("b", b)):
            rows = int(np.asarray(full.eval(q), dtype=bool).sum()) if isinstance(q, str) else None
            assert rows is None or rows > 0, f"{cls.__name__}: contrast {name!r} group {label} ({q!r}) selects no example"
    analyses = adapter.analyses()
    names = [a.name for a in [*core_analyses(), *analyses]]
    assert len(set(names)) == len(names), f"{cls.__name__}: analysis names repeat: {names}"
    for a in analyses:
        assert a.stage in STAGE_ORDER, f"{cls.__name__}: analysis {a.name!r} runs after unknown stage {a.stage!r}"
    # the analyses and the task loss read the model through the context: one that hands out the
    # checked model (not the run config's), undone afterwards so the adapter keeps its own
    base = adapter.ctx
    ctx = _CheckContext(adapter, model, base)
    ran = []
    try:
        # the analyses that need no artifact of a later stage run here, in memory
        for a in analyses:
            if a.stage != "examples":
                continue
            ctx.stage, ctx.subfolder = a.stage, ""
            rows, _ = a.run(ctx)
            for r in rows:
                assert isinstance(r, dict) and r.get("name") and "value" in r, (
                    f"{cls.__name__}: analysis {a.name!r} returned a row without name/value: {r!r}")
            ran.append(a.name)
        task = adapter.task_loss(ctx)
        if task is not None:  # the task runs, and splicing the site's own activations back changes nothing
            table = fidelity(model, adapter.sae_site, task, {"identity": lambda h: h},
                             positions=adapter.fidelity_positions, aliases=adapter.aliases).set_index("condition")
            assert np.isfinite(table.loss).all(), f"{cls.__name__}: task_loss is not finite: {table.loss.to_dict()}"
            assert abs(table.loss["identity"] - table.loss["clean"]) <= 1e-4 * max(1.0, abs(table.loss["clean"])), (
                f"{cls.__name__}: task_loss changes when the site's own activations are spliced back "
                f"({table.loss['clean']} -> {table.loss['identity']}): is it deterministic (eval mode, fixed masks)?")
    finally:
        adapter.ctx, adapter.trainer_options = base, base.trainer_options
    return {"n_examples": len(examples), "sites": sites, "store_rows": store.n_obs, "analyses": names,
            "analyses_run": ran, "task_loss": None if task is None else task.name}


def _head(inputs: object, n: int) -> object:
    if isinstance(inputs, (list, tuple, np.ndarray, pd.Series)):
        return inputs[:n]
    if hasattr(inputs, "__getitem__"):
        return inputs[:n]  # type: ignore[index]
    return list(itertools.islice(inputs, n))  # type: ignore[arg-type]
