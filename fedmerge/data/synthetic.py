"""FedProx's Synthetic(alpha, beta) data, generated from its published recipe."""

from __future__ import annotations

import numpy as np


def make_synthetic(
    *,
    alpha: float,
    beta: float,
    num_users: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Generate Synthetic(alpha, beta) of Li et al. (FedProx, MLSys 2020).

    For user :math:`k`:

    .. math::

        u_k \sim \mathcal N(0, \alpha^2),\quad B_k \sim \mathcal N(0, \beta^2),\\
        W_k, b_k \sim \mathcal N(u_k, 1),\quad v_k \sim \mathcal N(B_k, 1)^{d},\\
        x \sim \mathcal N(v_k, \Sigma),\ \Sigma_{jj} = j^{-1.2},\quad
        y = \arg\max(\mathrm{softmax}(W_k x + b_k)).

    Parameters
    ----------
    alpha : float
        Spread of the users' models (heterogeneity of :math:`p(y|x)`); >= 0.
    beta : float
        Spread of the users' input means (heterogeneity of :math:`p(x)`); >= 0.
    num_users : int (default: 30)
        Number of users, each with its own model and input distribution.
    dim : int (default: 60)
        Input dimension.
    num_classes : int (default: 10)
        Number of classes.
    rng : numpy.random.Generator
        Source of every random draw.

    Returns
    -------
    x : ndarray, shape (n, dim), float32
    y : ndarray, shape (n,), int64
    user : ndarray, shape (n,), int64
        The user that generated each sample (for the "natural" partition).

    Notes
    -----
    As in the reference generator, the number of samples per user follows a
    power law: ``lognormal(4, 2) + 50`` samples, capped here at 2,000 so that
    one user cannot hold most of the data set. The reference reads ``alpha``
    and ``beta`` as standard deviations, and so does this function.
    """
    for key, value in (("alpha", alpha), ("beta", beta)):
        if not value >= 0:  # also refuses NaN
            raise ValueError(f"{key}: got {value!r}; allowed: a number >= 0")
    sizes = np.minimum(rng.lognormal(4, 2, num_users).astype(int) + 50, 2000)
    cov = np.diag(np.arange(1, dim + 1, dtype=np.float64) ** -1.2)
    xs, ys, users = [], [], []
    for k in range(num_users):
        u_k = rng.normal(0, alpha)
        b_mean = rng.normal(0, beta)
        weights = rng.normal(u_k, 1, (dim, num_classes))
        bias = rng.normal(u_k, 1, num_classes)
        v_k = rng.normal(b_mean, 1, dim)
        x = rng.multivariate_normal(v_k, cov, int(sizes[k]))
        y = np.argmax(x @ weights + bias, axis=1)
        xs.append(x)
        ys.append(y)
        users.append(np.full(len(y), k))
    return (
        np.concatenate(xs).astype(np.float32),
        np.concatenate(ys).astype(np.int64),
        np.concatenate(users).astype(np.int64),
    )
