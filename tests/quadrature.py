"""log p(x) of a model with a 2-D latent by quadrature on a grid: the known answer AIS and importance sampling
are checked against (``tests/test_ais.py``, ``benchmarks/ais_throughput.py``).

Independent of the library's estimators, and of pytest, so that the benchmark can use it too.
"""

import math

import pyro.distributions as dist
import torch

import pyro_vae as pv


def log_px_by_quadrature(vae: pv.VAE, x: torch.Tensor, n: int = 800, half_width: float = 12.0):
    """log p(x) = log int p(z) p(x | z) dz for a 2-D latent, by the midpoint rule on [-w, w]^2 in float64.

    Returns the estimate and the share of the mass in the grid's outermost cells (a check on the
    truncation). For smooth, fast-decaying integrands the midpoint rule converges faster than any power
    of the spacing; the test checks the resolution by halving the grid.
    """
    return integral_by_quadrature(lambda z: vae.decoder(z)[:, 0], x, n, half_width)


def integral_by_quadrature(decoder_logits, x: torch.Tensor, n: int = 800, half_width: float = 12.0):
    """log int N(z; 0, I) prod_d Bernoulli(x_d; logit l_d(z)) dz over z in R^2, as :func:`log_px_by_quadrature`."""
    step = 2 * half_width / n
    grid = torch.linspace(-half_width + step / 2, half_width - step / 2, n, dtype=torch.float64)
    xs = x.flatten(1).double()
    total = border = torch.full((x.shape[0],), -math.inf, dtype=torch.float64)
    rows_per_chunk = 25
    with torch.no_grad():
        for first in range(0, n, rows_per_chunk):
            rows = torch.arange(first, min(first + rows_per_chunk, n))
            z = torch.cartesian_prod(grid[rows], grid)  # (rows * n, 2), row-major
            logits = decoder_logits(z.float()).flatten(1).double()
            # for binary x: log p(x | z) = sum_d x_d l_d - softplus(l_d), one product for all points
            log_terms = logits @ xs.T - torch.nn.functional.softplus(logits).sum(-1, keepdim=True)
            log_terms = (log_terms + dist.Normal(0.0, 1.0).log_prob(z).sum(-1, keepdim=True)).reshape(len(rows), n, -1)
            total = torch.logaddexp(total, log_terms.logsumexp((0, 1)))
            outer = log_terms[:, [0, -1]].flatten(0, 1)
            outer = torch.cat([outer, *(log_terms[i] for i, r in enumerate(rows) if r in (0, n - 1))])
            border = torch.logaddexp(border, outer.logsumexp(0))
    log_px = total + 2 * math.log(step)
    return log_px.float(), (border - total).float()
