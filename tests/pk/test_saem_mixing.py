"""SAEM on a weakly identified random effect: the 2-compartment IV bolus validation design,
where omega_Q has an RSE of ~20% (FOCE-I), keeps omega_Q at the likelihood's optimum.

Before the per-coordinate random-walk kernel of :mod:`genprog.infer.saem`, the joint
proposal's scale was set by the well-determined coordinates, eta_Q's draws stuck, and a long
run let omega_Q drift to zero (0.006 after 1,000 + 300 iterations, with an importance-sampling
-2LL 14 points above the optimum); now it stays near FOCE-I's estimate.
"""

import math

import pytest
import torch

from bench.pk_validation import simulated

pytestmark = pytest.mark.slow


def test_saem_keeps_a_weakly_identified_omega_at_the_optimum():
    torch.manual_seed(0)
    model, data, _ = simulated("bolus2", seed=0)
    focei = model.fit(data, "mle", standard_errors=False)
    saem = model.fit(data, "saem", exploration=1000, averaging=300, standard_errors=False, seed=0)
    j = model.random_effects.index("q")
    w_focei, w_saem = float(focei.estimates["omega"][j]), float(saem.estimates["omega"][j])
    # FOCE-I's own SE of omega_Q is ~0.045 (bench/README.md); SAEM's exact-likelihood
    # optimum may differ from FOCE-I's linearised one by about that much, not by 0.2
    assert abs(math.log(w_saem / w_focei)) < 0.35, (w_saem, w_focei)
    # the IS -2LL at SAEM's estimate is not worse than the FOCE-I objective at FOCE-I's by
    # more than the two approximations differ elsewhere (~1-2 points on these designs)
    assert saem.minus2ll < focei.minus2ll + 4.0, (saem.minus2ll, focei.minus2ll)
