"""M1+M2 of Kingma, Rezende, Mohamed & Welling, *Semi-Supervised Learning
with Deep Generative Models* (NeurIPS 2014, section 2.3): the semi-supervised
M2 trained on the latent code z1 of an already trained VAE (M1) instead of
on the pixels.

Generative model (``StackedSSVAE.model``), in the plate "data"::

    y_n  ~ p(y)                                       site "y"
    z_n  ~ p(z)                                       site "z"   (M2's code, the "style")
    f_n  ~ p(f | y_n, z_n) = N(mu(y_n, z_n), diag sigma^2)   site "z1"  (M2's likelihood)
    u_n  ~ p_M1(u)                                    site "z1_inactive"  (M1's prior on those units)
    x_n  ~ p(x | z1_n) = M1's likelihood(M1's decoder(z1_n))  site "x"

where z1 is put together from f on M1's *active* units (Burda et al.'s
Var_x E_q[z1_d] > 0.01), standardised, z1_d = m_d + s_d f_d, and from u on
the inactive ones, whose posteriors stay at M1's prior: p_M1(u) is that
prior on those units, so M1 needs a prior that factorises over its units,
a diagonal Gaussian (standard normal, Kingma et al.'s, or learned). The
standardisation (m, s) and the choice of units are fixed from the training
data by :class:`LatentFeatures`.

Inference network (``StackedSSVAE.guide``)::

    f_n ~ q(f | x_n)   M1's frozen encoder, standardised on the active units
    u_n ~ q(u | x_n)   M1's frozen encoder on the inactive units
    y_n ~ q(y | f_n)   M2's classifier, only where y is unobserved
    z_n ~ q(z | f_n, y_n)

Because q(z1 | x) is diagonal, splitting it into f and u is exact, and the
affine map z1 <-> f has the same Jacobian under p and q, so the
importance-sampled log p(x) of :mod:`pyro_vae.infer.importance` is the stacked
model's marginal likelihood of the pixels, with y summed over q(y | f).

M1's weights are frozen: its terms in the ELBO are constants, so training
the stacked model with the semi-supervised objective trains M2 on
draws of z1 from q(z1 | x), as Kingma et al. did. The classifier predicts
from the posterior means, q(y | f = E[f | x]). Kingma et al. report 96.67%
MNIST test accuracy from 100 labels with M1+M2 against 88.03% with M2 alone.
"""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..components.likelihoods import Gaussian
from ..components.priors import Prior, build_prior
from .base import ACTIVE_UNIT_THRESHOLD, register_model
from .ssvae import SSVAE, SemiSupervisedModel
from .vae import VAE

_instance_ids = itertools.count()


class LatentFeatures(nn.Module):
    """The split of M1's code into standardised active units f and inactive units u.

    :param z_dim: M1's latent dimension.
    :param active: indices of the active units.

    The buffers ``mean`` and ``std`` hold the standardisation; :meth:`fit` sets them.
    """

    def __init__(self, z_dim: int, active: list[int]):
        super().__init__()
        if not active:
            raise ValueError("M1 has no active latent units; train it longer before stacking M2 on it.")
        self.z_dim = int(z_dim)
        self.register_buffer("active", torch.as_tensor(active, dtype=torch.long))
        inactive = sorted(set(range(self.z_dim)) - set(active))
        self.register_buffer("inactive", torch.as_tensor(inactive, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(len(active)))
        self.register_buffer("std", torch.ones(len(active)))

    @classmethod
    def fit(cls, m1: VAE, x: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> LatentFeatures:
        """Choose the units whose posterior means vary more than ``threshold`` over ``x``; standardise them by the
        means' mean and standard deviation over ``x`` (the grayscale images, where training sees binarised draws)."""
        means = m1.latent_means(x)
        variance = means.var(0)
        features = cls(m1.z_dim, (variance > threshold).nonzero().squeeze(1).tolist())
        features.mean.copy_(means[:, features.active].mean(0))
        features.std.copy_(variance[features.active].sqrt())
        return features.to(x.device)

    @property
    def num_active(self) -> int:
        return len(self.active)

    def standardise(self, z1: torch.Tensor) -> torch.Tensor:
        """f = (z1 - m) / s on the active units."""
        return (z1[..., self.active] - self.mean) / self.std

    def assemble(self, f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """z1 from the standardised active units f and the inactive units u (which may broadcast)."""
        shape = torch.broadcast_shapes(f.shape[:-1], u.shape[:-1])
        z1 = f.new_empty(*shape, self.z_dim)
        z1[..., self.active] = self.mean + self.std * f
        z1[..., self.inactive] = u
        return z1


def _is_diagonal_normal(prior: dist.TorchDistribution) -> bool:
    """Whether ``prior`` is ``Normal(loc, scale).to_event(1)``: independent Gaussian units."""
    return isinstance(prior, dist.Independent) and type(prior.base_dist) is dist.Normal


@register_model
class StackedSSVAE(SemiSupervisedModel):
    """M1+M2: a semi-supervised M2 on the code of a trained, frozen VAE (M1).

    Same interface as :class:`~pyro_vae.models.ssvae.SSVAE` (``model``, ``guide``,
    ``classify``, ``transfer_style``, ...), so the training engine, the
    evaluator and the figures take either.

    :param m1: the trained VAE; its weights are frozen.
    :param features: the split of M1's code, from :meth:`LatentFeatures.fit` on the training data.
    :param z_dim: dimension of M2's code z.
    :param num_classes: number of values of y.
    :param prior: M2's prior p(z), a :class:`~pyro_vae.components.priors.Prior`, its short name or config dict
        (default standard normal). A VampPrior named so keeps its pseudo-inputs free (``bounds=None``), as M2's
        data are M1's standardised features, not images in [0, 1].
    :param hidden: hidden sizes of M2's classifier, encoder and decoder.
    :param class_prior: ``"uniform"`` or ``"learned"`` p(y).
    :param activation: M2's hidden activation, ``"softplus"`` (Kingma et al.'s) or ``"relu"`` (runs
        written before 2026-12-02, whose config did not record it).
    :param pseudo_input_labels: how a VampPrior's pseudo-inputs meet the label, as
        :class:`~pyro_vae.models.ssvae.SSVAE`'s.
    """

    def __init__(
        self,
        m1: VAE,
        features: LatentFeatures,
        z_dim: int = 10,
        num_classes: int = 10,
        prior: Prior | str | dict | None = None,
        *,
        hidden=(500,),
        class_prior: str = "uniform",
        activation: str = "softplus",
        pseudo_input_labels: str = "summed",
        name: str | None = None,
    ):
        super().__init__()
        self.check_m1(m1, features)
        named = {"name": prior} if isinstance(prior, str) else prior
        if isinstance(named, dict) and named.get("name") == "vamp":  # M2's data: standardised features, not images
            prior = {"bounds": None, **named}
        if features.z_dim != m1.z_dim:
            raise ValueError(f"The features split a {features.z_dim}-dim code but M1 has z_dim={m1.z_dim}.")
        self.m1 = m1.requires_grad_(False)
        self.features = features
        self.m2 = SSVAE(
            (features.num_active,),
            z_dim,
            num_classes,
            prior,
            Gaussian("per-dim", init_sigma=1.0),
            hidden=hidden,
            class_prior=class_prior,
            activation=activation,
            pseudo_input_labels=pseudo_input_labels,
        )
        self.pyro_name = name or f"stacked{next(_instance_ids)}"

    name = "stacked-ssvae"

    @staticmethod
    def check_m1(m1, features: LatentFeatures) -> None:
        """Refuse an M1 that the stacked model cannot take: not a :class:`~pyro_vae.models.vae.VAE`, or one with
        inactive units whose prior does not factorise over the units (p_M1(u) on those is its marginal)."""
        if not isinstance(m1, VAE):
            raise TypeError(
                f"M1 must be a pv.VAE (one stochastic layer, whose code M2 models); got a {type(m1).__name__}."
            )
        if len(features.inactive) and not _is_diagonal_normal(m1.prior()):
            raise ValueError(
                f"M1+M2 models M1's inactive units by M1's prior on them, which needs a prior that factorises over "
                f"the units (standard-normal or learned-gaussian); this M1 has the {m1.prior.name!r} prior. Train "
                "M1 with the standard-normal prior, Kingma et al.'s M1 (pyro-vae train --prior standard-normal)."
            )

    @property
    def x_shape(self) -> tuple[int, ...]:
        return self.m1.x_shape

    @property
    def describable(self) -> bool:
        """As M1 is: an M1 of networks of one's own has no config that rebuilds it."""
        return self.m1.describable

    @property
    def num_classes(self) -> int:
        return self.m2.num_classes

    @property
    def z_dim(self) -> int:
        return self.m2.z_dim

    @property
    def prior(self) -> Prior:
        return self.m2.prior

    @property
    def likelihood(self):
        return self.m1.likelihood

    # ----------------------------------------------------------------- Pyro
    def modules_for(self, role: str) -> dict[str, nn.Module]:
        return {f"m2.{name}": module for name, module in self.m2.modules_for(role).items()}  # M1 is frozen

    def label_prior(self) -> dist.OneHotCategorical:
        return self.m2.class_prior_net()

    def observe(self, z, y_onehot, n, device, x):
        """f ~ p(f | y, z), u ~ p_M1(u), x ~ p(x | z1 = (m + s f, u))."""
        f = pyro.sample("z1", self.m2.decode(z, y_onehot))
        u = self._sample_inactive(n, device)
        return pyro.sample("x", self.m1.decode(self.features.assemble(f, u)), obs=x)

    def guide_features(self, x: torch.Tensor) -> torch.Tensor:
        """f ~ q(f | x) and u ~ q(u | x) from the frozen M1; q(y | .) and q(z | ., y) read f."""
        loc, scale = self.m1.encode(x)
        split = self.features
        f = pyro.sample("z1", dist.Normal(split.standardise(loc), scale[:, split.active] / split.std).to_event(1))
        if len(split.inactive):
            pyro.sample("z1_inactive", dist.Normal(loc[:, split.inactive], scale[:, split.inactive]).to_event(1))
        return f

    def classifier_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.m2.classifier(features)

    def encode_features(self, features, y_onehot):
        return self.m2.encode(features, y_onehot)

    def _inactive_prior(self) -> dist.Normal:
        """p_M1(u): M1's prior, a diagonal Gaussian (checked when built), on its inactive units."""
        prior, inactive = self.m1.prior().base_dist, self.features.inactive
        return dist.Normal(prior.loc[inactive], prior.scale[inactive])

    def _sample_inactive(self, n: int, device) -> torch.Tensor:
        inactive = len(self.features.inactive)
        if not inactive:
            return torch.zeros(n, 0, device=device)
        return pyro.sample("z1_inactive", self._inactive_prior().expand([n, inactive]).to_event(1))

    # ------------------------------------------------------------ utilities
    def feature_means(self, x: torch.Tensor) -> torch.Tensor:
        """E[f | x]: M1's posterior means on the active units, standardised."""
        return self.features.standardise(self.m1.encode(x)[0])

    def one_hot(self, y: torch.Tensor) -> torch.Tensor:
        return self.m2.one_hot(y)

    def encode(self, x: torch.Tensor, y_onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z | E[f | x], y); y defaults to the classifier's most probable class."""
        return self.m2.encode(self.feature_means(x), y_onehot)

    def decode(self, z: torch.Tensor, y_onehot: torch.Tensor):
        """p(x | z1) at z1 = (the mean of p(f | y, z), the mean of p_M1(u))."""
        f = self.m2.decode(z, y_onehot).mean
        return self.m1.decode(self.features.assemble(f, self._inactive_prior().mean))

    def sample_labels(self, num_samples: int) -> torch.Tensor:
        """Class indices drawn from p(y)."""
        return self.m2.sample_labels(num_samples)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        """Refuse data M1 cannot take, naming the fix."""
        self.m1.check_data(x, what)

    def check_labels(self, y: torch.Tensor, x: torch.Tensor, what: str = "labels") -> None:
        self.m2.check_labels(y, x, what)

    # --------------------------------------------------------------- config
    def config(self) -> dict:
        """Everything needed to rebuild this model with :meth:`from_config` (the weights are in the checkpoint)."""
        return {
            "type": self.name,
            "m1": self.m1.config(),
            "active_units": self.features.active.tolist(),
            "m2": self.m2.config(),
        }

    @classmethod
    def completed_config(cls, config: dict) -> dict:
        """The nested M1 and M2 configs completed as their own types complete them."""
        return {**config, "m1": VAE.completed_config(config["m1"]), "m2": SSVAE.completed_config(config["m2"])}

    @classmethod
    def from_config(cls, config: dict) -> StackedSSVAE:
        """The M1+M2 model that :meth:`config` describes, with fresh weights (M2's layers as the run had them)."""
        config = cls.completed_config(config)
        m1, m2 = VAE.from_config(config["m1"]), config["m2"]
        return cls(
            m1,
            LatentFeatures(m1.z_dim, config["active_units"]),
            m2["z_dim"],
            m2["num_classes"],
            build_prior(m2["prior"]),
            hidden=m2["hidden"],
            class_prior=m2["class_prior"],
            activation=m2["activation"],
            pseudo_input_labels=m2["pseudo_input_labels"],
        )
