"""Renamed options and records of the zoo keep working: the old keyword (``max_iter``,
``max_steps``) is accepted with a ``DeprecationWarning`` and means the same as ``max_iters``;
the old record attributes (``em_info``, ``vi_info``, ``cd_info``, ``fit_info``,
``last_sample_info``) are read-only aliases of ``info``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from genprog.errors import ConvergenceWarning
from genprog.models import (
    MADE,
    RBM,
    DirichletProcessMixture,
    EnergyBasedModel,
    FactorAnalysis,
    GaussianMixture,
    LinearGaussianSSM,
)
from genprog.models.ebm import GaussianEnergy


def _blobs(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(-2.0, 1.0, (n // 2, 3)), rng.normal(2.0, 1.0, (n // 2, 3))])


def _fit(fn, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn(**kw)


FITS = {
    "GaussianMixture.mle": (lambda **kw: GaussianMixture.mle(_blobs(), k=2, n_init=1, **kw),
                            "max_iter", 5, "em_info"),
    "FactorAnalysis.mle": (lambda **kw: FactorAnalysis.mle(_blobs(), k=1, **kw),
                           "max_iter", 5, "em_info"),
    "DirichletProcessMixture.fit_variational": (
        lambda **kw: DirichletProcessMixture.fit_variational(_blobs(), truncation=4, **kw),
        "max_iter", 5, "vi_info"),
    "LinearGaussianSSM.mle": (
        lambda **kw: LinearGaussianSSM.mle(np.random.default_rng(0).normal(size=(40, 1)),
                                           state_dim=1, **kw),
        "max_iter", 5, "fit_info"),
    "MADE.mle": (lambda **kw: MADE.mle(torch.bernoulli(torch.full((40, 4), 0.3),
                                                       generator=torch.Generator().manual_seed(0)),
                                       hidden=(8,), window=2, progress=False, **kw),
                 "max_steps", 6, None),
}


@pytest.mark.parametrize("name", list(FITS))
def test_old_iteration_keyword_is_a_deprecated_alias_of_max_iters(name):
    fn, old, value, _ = FITS[name]
    new = _fit(fn, max_iters=value)
    with pytest.warns(DeprecationWarning, match=f"{old}= is deprecated; use max_iters="):
        via_old = _fit(fn, **{old: value})
    if isinstance(new.info, dict):
        assert via_old.info["num_steps"] == new.info["num_steps"]
        assert via_old.info["loss_trace"] == new.info["loss_trace"]
    else:
        assert via_old.info.num_iters == new.info.num_iters
    with pytest.raises(TypeError, match="give max_iters only"):
        fn(**{old: value, "max_iters": value})


@pytest.mark.parametrize("name", [n for n, spec in FITS.items() if spec[3] is not None])
def test_old_record_name_is_a_read_only_alias_of_info(name):
    fn, _, value, old = FITS[name]
    fit = _fit(fn, max_iters=value)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; use .info"):
        assert getattr(fit, old) is fit.info
    with pytest.raises(AttributeError):
        setattr(fit, old, None)


def test_rbm_cd_info_is_info():
    fit = RBM.mle(torch.bernoulli(torch.full((50, 4), 0.5), generator=torch.Generator().manual_seed(0)),
                  n_hidden=2, epochs=2)
    assert len(fit.info.reconstruction_error) == 2
    with pytest.warns(DeprecationWarning):
        assert fit.cd_info is fit.info


def test_ebm_last_sample_info_is_info_last_sample():
    m = EnergyBasedModel(energy=GaussianEnergy(torch.zeros(2), torch.eye(2)), dim=2)
    m.sample(20, seed=0, steps=20)
    assert set(m.info["last_sample"]) == {"step_size", "acceptance_rate"}
    with pytest.warns(DeprecationWarning):
        assert m.last_sample_info is m.info["last_sample"]
