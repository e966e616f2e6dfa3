"""The data-aware fit of one replacement, in closed form, from second-moment statistics.

A chain M[->B][->A] computes the pre-activation z = [x, 1] @ W (B folded into M: `folded_map`).
Its replacement computes k = K x (+ intercept), and for C >= F also l = L (P k) (+ intercept),
with P the interleave; the output is A(k) + A(l), or P k for an expansion. Everything below
works on the statistics of the calibration images only (`ChainStats`, a few (C+1)^2 matrices),
never on the activations themselves:

* x is the chain's input in the *converted* network and z comes from the *original* network's
  input (asymmetric reconstruction, Zhang et al. 2015): each fit also corrects the error that
  earlier replacements left in x.
* Given L, the output is linear in K, and given K linear in L; each step is a ridge least-squares
  problem per group (the block-diagonal structure), alternated a few times. K given L couples
  the groups through P and L, and is solved by conjugate gradients preconditioned with the
  per-group solve of K alone.
* Activated chains are fitted on the pre-activation (A(k) then approximates A(z)) and keep L
  quiet; linear chains (`project_conv`) fit K and L together.

The fitted maps are then written as K [-> B'] and L [-> B''] with batch-norm statistics equal
to the fitted outputs' own mean and variance, so a batch norm in training mode reproduces the
fit instead of normalising it away (`layer_weights`).
"""

from dataclasses import dataclass

import numpy as np
from keffconvert.layers.kernels import interleave_permutation
from keffconvert.layers.padded import padded_input_index
from keffconvert.rewrite.weights import bn_affine, block_diagonal


# Relative residual at which the K-given-L conjugate gradients stop. Each solve is one step of an
# alternation that L-BFGS polishes afterwards, so it need not be exact: on the 16 project convs
# of B0 trained on digits, 1e-3 instead of 1e-9 left every chain's fitted error within 1.2% of
# its value (the mean unchanged) and the fits took 3.4x less time.
CG_TOLERANCE = 1e-3

# The floor of every relative ridge: it only matters where a whole Gram matrix is zero.
ABSOLUTE_RIDGE_FLOOR = 1e-12


def folded_map(conv, bn):
    """W of shape (C+1, F): the chain's pre-activation is [x, 1] @ W (B in inference mode)."""
    weights = conv.get_weights()
    kernel = weights[0][0, 0].astype("float64")
    bias = weights[1].astype("float64") if conv.use_bias else np.zeros(kernel.shape[1])
    if bn is not None:
        scale, shift = bn_affine(bn)
        kernel, bias = kernel * scale, bias * scale + shift
    return np.vstack([kernel, bias[None]])


class ChainStats:
    """Second moments of [x_conv, 1] and [x_orig, 1] over every pixel of the calibration images."""

    def __init__(self, channels):
        size = channels + 1
        self.conv = np.zeros((size, size))  # sum of xc^T xc
        self.cross = np.zeros((size, size))  # sum of xc^T xo
        self.orig = np.zeros((size, size))  # sum of xo^T xo

    @classmethod
    def from_moments(cls, conv, cross, orig):
        """The statistics from the three (C+1, C+1) moments of [x, 1] (`keffconvert.fit.stream`)."""
        stats = cls(len(conv) - 1)
        stats.conv, stats.cross, stats.orig = (np.asarray(m, "float64") for m in (conv, cross, orig))
        return stats

    @property
    def count(self):
        return self.conv[-1, -1]


@dataclass
class Fit:
    """The fitted maps on [x, 1]: K's (C+1, F) and, for C >= F, L's (F+1, F) on [P k, 1]."""

    k: np.ndarray
    l: np.ndarray | None
    relative_error: float


class ChainFit:
    """Fits one chain's replacement to its folded map W from its `ChainStats`."""

    def __init__(self, stats, target, groups, *, intercept, fit_l, order=None, ridge=1e-4, grouping=None):
        for name, value in (("moments", stats.conv), ("cross moments", stats.cross),
                            ("original moments", stats.orig), ("folded map", target)):
            if not np.all(np.isfinite(value)):
                raise ValueError(f"non-finite {name} (activations overflowed or NaN images)")
        self.stats = stats
        self.channels = stats.conv.shape[0] - 1
        self.filters = target.shape[1]
        self.groups = groups
        self.intercept = intercept
        self.fit_l = fit_l
        self.ridge = ridge
        self.target = target if order is None else target[:, order]  # K's filter q computes z[:, order[q]]
        self.b = stats.cross @ self.target  # sum of xc^T z
        if grouping is None:
            grouping = BlockGrouping(self.channels, self.filters, groups)
        self.grouping = grouping
        self.perm = grouping.perm
        self.k_mask = grouping.k_mask(intercept)
        self.l_mask = grouping.l_mask(intercept)
        self._k_solver = _GroupSolver(stats.conv, self.k_mask, ridge)

    def explained_by_group(self):
        """(F, g): how much of each target column each group's inputs reproduce (sum of squares)."""
        mask = _group_mask(self.channels, self.groups, self.groups, self.intercept)  # rows of each group
        return _GroupSolver(self.stats.conv, mask, self.ridge).quadratic_forms(self.b)

    def run(self, rounds=3):
        k = self.solve_k_alone(self.b)
        if not self.fit_l:
            return Fit(k, None, self.relative_error(k, None))
        best = None
        l = None
        for _ in range(rounds):
            l = self.solve_l(k)
            error = self.relative_error(k, l)
            if best is None or error < best.relative_error:
                best = Fit(k.copy(), l.copy(), error)
            k = self._solve_k_given_l(k, l)
        error = self.relative_error(k, self.solve_l(k))
        if error < best.relative_error:
            best = Fit(k, self.solve_l(k), error)
        k, l = self._polish(best.k, best.l)
        error = self.relative_error(k, l)
        return Fit(k, l, error) if error < best.relative_error else best

    def _polish(self, k, l, iterations=100):
        """Both maps at once by L-BFGS from the alternation's result: alternating least squares
        creeps along the valley of a bilinear problem, a joint quasi-Newton step does not.
        A @ K is computed from K's block-sparse entries only (g times fewer multiplications)."""
        from scipy import sparse
        from scipy.optimize import minimize

        a = self.stats.conv
        k_rows, k_cols = np.nonzero(self.k_mask)
        l_idx = np.nonzero(self.l_mask)
        n_k = len(k_rows)
        lam = ridge_penalty(a, self.ridge)
        scale = np.trace(self.target.T @ self.stats.orig @ self.target) or 1.0

        def unpack(v):
            kk, ll = np.zeros_like(k), np.zeros_like(l)
            kk[k_rows, k_cols], ll[l_idx] = v[:n_k], v[n_k:]
            return kk, ll

        def objective(v):
            kk, ll = unpack(v)
            k_t = sparse.csr_matrix((v[:n_k], (k_cols, k_rows)), shape=(self.filters, self.channels + 1))
            l_w = sparse.csr_matrix(ll[:-1])  # block-sparse: F/g nonzeros a column
            ak = (k_t @ a).T  # A K (A is symmetric)
            a_theta = ak + (l_w.T @ ak[:, self.perm].T).T + np.outer(a[:, -1], ll[-1])
            theta = kk + (l_w.T @ kk[:, self.perm].T).T
            theta[-1] += ll[-1]
            d_theta = 2 * (a_theta - self.b)
            value = np.sum(theta * a_theta) - 2 * np.sum(theta * self.b) + lam * np.sum(kk * kk)
            d_k = d_theta + 2 * lam * kk
            d_k[:, self.perm] += (l_w @ d_theta.T).T  # through P K, the input of L
            d_l = np.vstack([k_t[self.perm] @ d_theta, d_theta[-1:]])
            return value / scale, np.concatenate([d_k[k_rows, k_cols], d_l[l_idx]]) / scale

        start = np.concatenate([k[k_rows, k_cols], l[l_idx]])
        with np.errstate(over="ignore", invalid="ignore"):
            result = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": iterations})
        if not np.all(np.isfinite(result.x)):
            return k, l
        return unpack(result.x)

    # -- the three least-squares steps ------------------------------------------------------

    def solve_k_alone(self, rhs):
        """Per group: (A_jj + ridge) theta = rhs_j on the group's inputs (and the intercept)."""
        return self._k_solver(rhs)

    def l_inputs(self, k):
        """G with [P k, 1] = [x, 1] @ G."""
        g = np.zeros((self.channels + 1, self.filters + 1))
        g[:, :self.filters] = k[:, self.perm]
        g[-1, -1] = 1.0
        return g

    def solve_l(self, k):
        """L on [P k, 1] fitted to the residual z - k."""
        g = self.l_inputs(k)
        gram = g.T @ self.stats.conv @ g
        rhs = g.T @ (self.b - self.stats.conv @ k)
        return _GroupSolver(gram, self.l_mask, self.ridge)(rhs)

    def _solve_k_given_l(self, k, l):
        """min ||[x,1] K T + 1 l0 - z||^2 over block-diagonal K, with T = I + P L: CG on the masked
        normal equations, preconditioned by the per-group solve of K alone."""
        a = self.stats.conv
        t = np.eye(self.filters)
        t[self.perm, :] += l[:self.filters]  # (k P) L = k (P L): row perm[o] of P L is row o of L
        s = t @ t.T
        rhs = (self.b - np.outer(a[:, -1], l[-1])) @ t.T * self.k_mask
        penalty = ridge_penalty(a, self.ridge)

        rows, cols = np.nonzero(self.k_mask)

        def operator(theta):
            return (_times_sparse(a, theta, rows, cols) @ s) * self.k_mask + penalty * theta

        theta = k.copy()
        residual = rhs - operator(theta)
        z = self.solve_k_alone(residual)
        direction = z.copy()
        rz = np.sum(residual * z)
        norm0 = np.sqrt(np.sum(rhs * rhs)) or 1.0
        for _ in range(100):
            q = operator(direction)
            curvature = np.sum(direction * q)
            if not (rz > 0 and curvature > 0 and np.isfinite(curvature)):
                break  # converged to rounding, or rounding made the step meaningless
            alpha = rz / curvature
            theta += alpha * direction
            residual -= alpha * q
            if np.sqrt(np.sum(residual * residual)) < CG_TOLERANCE * norm0:
                break
            z = self.solve_k_alone(residual)
            rz_new = np.sum(residual * z)
            direction = z + (rz_new / rz) * direction
            rz = rz_new
        return theta

    # -- measures ------------------------------------------------------------------------------

    def total_map(self, k, l):
        """The replacement's output before the activation, as one (C+1, F) map on [x, 1]."""
        if l is None:
            return k
        return k + self.l_inputs(k) @ l

    def relative_error(self, k, l):
        """sum ||y - z||^2 / sum ||z - mean z||^2 on the calibration pixels (0 is exact)."""
        theta = self.total_map(k, l)
        a, n = self.stats.conv, self.stats.count
        z_sq = np.trace(self.target.T @ self.stats.orig @ self.target)
        z_sum = self.stats.orig[-1] @ self.target
        spread = z_sq - z_sum @ z_sum / n
        error = z_sq - 2 * np.sum(theta * self.b) + np.trace(theta.T @ a @ theta)
        return float(max(error, 0.0) / spread) if spread > 0 else 0.0


def ridge_penalty(gram, ridge):
    """The ridge added to every diagonal entry: `ridge` times the Gram's mean diagonal, so it scales
    with the data; never below an absolute floor, so an all-zero input (a dead layer) still solves."""
    scale = np.trace(gram) / len(gram)
    penalty = ridge * scale if np.isfinite(scale) else 0.0
    return max(penalty, ridge * ABSOLUTE_RIDGE_FLOOR)


def regularised_inverses(blocks, ridge):
    """(D B D + ridge I)^-1 scaled back, for a stack (..., r, r) of symmetric PSD Gram blocks B,
    with D = diag(B)^-1/2: the ridge is relative to each input's own scale.

    Real networks make these blocks singular (dead ReLU channels, channels stuck at ReLU6's 6 that
    copy the intercept row, duplicated channels), float32 moments make them slightly indefinite on
    top (a Cholesky factorisation refuses both), and their inputs may differ in scale by orders of
    magnitude (a ridge relative to the mean diagonal would silence the small ones). Negative
    eigenvalues are rounding and are clipped to zero, so the inverse always exists; an input that
    is zero on every pixel gets a zero row and column."""
    blocks = (blocks + np.swapaxes(blocks, -1, -2)) / 2
    diagonal = np.diagonal(blocks, axis1=-2, axis2=-1)
    alive = diagonal > np.finfo("float64").tiny * np.maximum(np.max(diagonal, axis=-1, keepdims=True), 1.0)
    d = np.where(alive, 1.0 / np.sqrt(np.where(alive, diagonal, 1.0)), 0.0)
    normalised = blocks * d[..., :, None] * d[..., None, :]
    values, vectors = np.linalg.eigh(normalised)
    values = np.maximum(values, 0.0) + max(ridge, ABSOLUTE_RIDGE_FLOOR)
    inverse = (vectors / values[..., None, :]) @ np.swapaxes(vectors, -1, -2)
    return inverse * d[..., :, None] * d[..., None, :]


def _times_sparse(a, theta, rows, cols):
    """a @ theta for a theta that is zero outside (rows, cols): the cost of its nonzeros only."""
    from scipy import sparse

    return (sparse.csr_matrix((theta[rows, cols], (cols, rows)), shape=theta.shape[::-1]) @ a.T).T


def _group_mask(channels, filters, groups, intercept):
    """(channels+1, filters) 0/1: group j's inputs feed group j's outputs; the last row is the intercept."""
    rows = np.arange(channels)[:, None] // (channels // groups)
    cols = np.arange(filters)[None, :] // (filters // groups)
    mask = np.zeros((channels + 1, filters))
    mask[:channels] = rows == cols
    mask[-1] = 1.0 if intercept else 0.0
    return mask


class _GroupSolver:
    """The per-group ridge solves (G_jj + ridge)^-1 of a grouped problem, all groups at once.

    A group is a set of columns of `mask` with the same rows (its inputs, plus the intercept row
    when there is one). When every group has as many rows and columns (the 2021 method) the
    inverses are one (g, r, r) stack applied by one batched matmul: the fit calls these solves
    thousands of times, and one LAPACK call per group made Python the bottleneck.
    """

    def __init__(self, gram, mask, ridge):
        patterns, column_group = np.unique(mask.T, axis=0, return_inverse=True)
        self.rows = [np.flatnonzero(pattern) for pattern in patterns]
        self.column_group = column_group.ravel()
        self.cols = [np.flatnonzero(self.column_group == j) for j in range(len(patterns))]
        self.mask = mask
        self.batched = len({len(r) for r in self.rows}) == 1 and len({len(c) for c in self.cols}) == 1
        if self.batched:
            self.index = (np.stack(self.rows)[:, :, None], np.stack(self.cols)[:, None, :])
            rows = self.index[0]
            self.stack = regularised_inverses(gram[rows, np.swapaxes(rows, 1, 2)], ridge)
            self.inverse = list(self.stack)
        else:
            self.inverse = [regularised_inverses(gram[np.ix_(rows, rows)], ridge) for rows in self.rows]

    def __call__(self, rhs):
        """theta with theta[rows_j, cols_j] = (G_jj + ridge)^-1 rhs[rows_j, cols_j]; 0 off the mask."""
        theta = np.zeros_like(rhs)
        if self.batched:
            theta[self.index] = self.stack @ rhs[self.index]
        else:
            for rows, cols, inverse in zip(self.rows, self.cols, self.inverse):
                theta[np.ix_(rows, cols)] = inverse @ rhs[np.ix_(rows, cols)]
        return theta * self.mask

    def quadratic_forms(self, rhs):
        """(columns of rhs, columns of the mask): rhs^T (G_jj + ridge)^-1 rhs over the rows of the
        group j that each column of the mask belongs to."""
        forms = np.stack([np.sum(rhs[rows] * (inverse @ rhs[rows]), axis=0)
                          for rows, inverse in zip(self.rows, self.inverse)], axis=1)
        return forms[:, self.column_group]


class BlockGrouping:
    """The 2021 method's structure: g equal blocks of inputs and filters, the interleave P with
    step F/g between K and L (METHOD.md)."""

    def __init__(self, channels, filters, groups):
        self.channels, self.filters, self.groups = channels, filters, groups
        step = filters // groups
        self.perm = interleave_permutation(filters, step) if step > 1 else np.arange(filters)

    def k_mask(self, intercept):
        return _group_mask(self.channels, self.filters, self.groups, intercept)

    def l_mask(self, intercept):
        return _group_mask(self.filters, self.filters, self.groups, intercept)

    def kernel(self, theta_core, role):
        """The stored grouped kernel (1, 1, C/g, F) of a dense (C, F) fitted map."""
        return block_diagonal(theta_core[None, None], self.groups)


class PaddedGrouping:
    """The 2022 variant's structure (`layers.PaddedGroupedPointwiseConv2D`): filter f reads the
    input channels `padded_input_index[:, f]`; K's outputs are interleaved with step F // cpg
    before L (which may not divide F)."""

    def __init__(self, channels, filters, channels_per_group):
        self.channels, self.filters, self.cpg = channels, filters, channels_per_group
        step = filters // channels_per_group
        self.perm = interleave_permutation(filters, step) if step > 1 else np.arange(filters)

    def _mask(self, channels, intercept):
        index = padded_input_index(channels, self.filters, self.cpg)
        mask = np.zeros((channels + 1, self.filters))
        mask[index, np.arange(self.filters)[None, :]] = 1.0
        mask[-1] = 1.0 if intercept else 0.0
        return mask

    def k_mask(self, intercept):
        return self._mask(self.channels, intercept)

    def l_mask(self, intercept):
        return self._mask(self.filters, intercept)

    def kernel(self, theta_core, role):
        channels = self.channels if role == "k" else self.filters
        index = padded_input_index(channels, self.filters, self.cpg)
        return theta_core[index, np.arange(self.filters)[None, :]][None, None]


def layer_weights(theta, gram, grouping, *, use_bias, bn_epsilon, role="k"):
    """(conv weights, batch-norm weights or None) that compute [x, 1] @ theta.

    With a batch norm the kernel computes u = x @ theta[:-1]; the batch norm's moving mean and
    variance are u's own on the calibration images and gamma = sqrt(var + eps),
    beta = mean + intercept, so it returns u + intercept in inference mode and nearly that in
    training mode. Without one the intercept is the conv's bias.
    """
    kernel = grouping.kernel(theta[:-1], role).astype("float32")
    filters = theta.shape[1]
    bias = theta[-1].astype("float32")
    if bn_epsilon is None:
        return [kernel] + ([bias] if use_bias else []), None
    n = gram[-1, -1]
    core = theta[:-1]
    mean = gram[-1, :-1] @ core / n
    second = np.sum(core * (gram[:-1, :-1] @ core), axis=0) / n
    var = np.maximum(second - mean ** 2, 0.0)
    conv = [kernel] + ([np.zeros(filters, "float32")] if use_bias else [])
    bn = [np.sqrt(var + bn_epsilon), mean + bias, mean, var]
    return conv, [w.astype("float32") for w in bn]
