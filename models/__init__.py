"""The genprog model zoo (installed as ``genprog.models``): classic and deep generative models
whose operations override genprog's generic, inference-backed ones with exact forms.

Every class is a :class:`genprog.Model` (see :mod:`genprog.models.base` for the
conventions); :func:`capabilities` lists, per class and operation, what is exact, what is
estimated and what is unavailable.
"""

from .autoregressive import AR, DiscreteAR
from .base import REGISTRY, ZooModel, capabilities
from .circuit import ProbabilisticCircuit
from .cnf import ContinuousFlow
from .copula import GaussianCopula
from .diffusion import Diffusion
from .discriminant import GaussianDiscriminant
from .dpmm import DirichletProcessMixture

# isort: off
from .rbm import RBM  # registered before EnergyBasedModel: the capability table's row order
# isort: on
from .ebm import EnergyBasedModel
from .flow import Flow
from .gan import GAN
from .gaussian import PPCA, FactorAnalysis, Gaussian
from .gaussian_process import GaussianProcess
from .hmm import HMM
from .latent_ode import LatentODE
from .lda import LDA
from .made import MADE
from .mixture import GaussianMixture
from .naive_bayes import NaiveBayes
from .point_process import HawkesProcess, InhomogeneousPoissonProcess, PoissonProcess
from .state_space import LinearGaussianSSM
from .vae import VAE

__all__: list[str] = [
    "AR",
    "GAN",
    "HMM",
    "LDA",
    "MADE",
    "PPCA",
    "RBM",
    "REGISTRY",
    "VAE",
    "ContinuousFlow",
    "Diffusion",
    "DirichletProcessMixture",
    "DiscreteAR",
    "EnergyBasedModel",
    "FactorAnalysis",
    "Flow",
    "Gaussian",
    "GaussianCopula",
    "GaussianDiscriminant",
    "GaussianMixture",
    "GaussianProcess",
    "HawkesProcess",
    "InhomogeneousPoissonProcess",
    "LatentODE",
    "LinearGaussianSSM",
    "NaiveBayes",
    "PoissonProcess",
    "ProbabilisticCircuit",
    "ZooModel",
    "capabilities",
]
