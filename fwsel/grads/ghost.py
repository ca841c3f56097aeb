"""Token-Gram ("ghost") products for wide layers and short rows (docs/method.md#per-sample-gradient-products).

For a captured Linear, row i's weight gradient is `G_i = E_i^T X_i` (`X_i`: the row's layer
inputs, `T_i x d_in`; `E_i`: the gradients at the layer output, `T_i x d_out`). Instead of
forming `G_i` (`T d_in d_out` per row, `d_in d_out` memory per row), keep the factors and use

    <G_i, G_j> = sum_{t,s} (x_it . x_js) (e_it . e_js)              (cost T_i T_j (d_in + d_out))

chunked over tokens so that no more than `chunk x chunk` token pairs exist at once.

Cost model (per layer, from the real shapes; N pool rows of about T tokens): the full N x N
Gram costs `N^2 T^2 (d_in + d_out)` by token Gram and `N^2 d_in d_out (1 + 2T/N)` by
materialising (forming every G_i plus the dot products), so token Gram wins when
`T^2 (d_in + d_out) < d_in d_out (1 + 2T/N)`: about `T^2 < d/2` for a square layer, i.e.
short rows through wide layers. It then also holds less memory (`T (d_in + d_out)` per row).

Products with a direction `U` (`b = <G_i, M U>` for `U = g_T`, Adam's momentum, ...) stay
exact for any diagonal metric: `<G_i, W> = sum_t e_it^T W x_it` with `W = M ⊙ U` formed once
(with `g_T` itself one matmul over the target tokens): together as costly as the weight gradient
a plain backward forms. In sgd geometry without extra directions `b` and `y2` come instead from
the token Gram of pool and target rows (cheap for short rows).
The N x N Gram under a diagonal metric `M` does not factor; it is exact for `M = I` and uses a
rank-1 approximation `M ≈ u c^T` (from the row and column means of `M` as a `d_out x d_in`
matrix, on a wide layer over a sample of its rows and columns; exact when `M` has rank 1):
then `<G_i, M ⊙ G_j> = sum_{t,s} (x_it ⊙ c . x_js) (e_it ⊙ u . e_js)`. The one-pass update
`sum_S w_i G_i / |S| = E_S^T diag(w / |S|) X_S` is one matmul over the selected rows' tokens.
"""

from __future__ import annotations

import torch

from .metric import adam_diag_sample

PATHS = ("auto", "materialize", "ghost")


def prefers_ghost(n_rows: int, tokens: float, d_in: int, d_out: int) -> bool:
    """The cost model above: is the token-Gram cheaper than materialising for this layer?"""
    n, t = max(int(n_rows), 1), float(tokens)
    return t * t * (d_in + d_out) < d_in * d_out * (1.0 + 2.0 * t / n)


def token_gram_sites(sites, head, batch: dict, n: int, force: bool = False) -> set:
    """Indices of the captured `sites` whose weight takes the token Gram for this batch (n pool
    rows): where the cost model says it is cheaper (`force`: everywhere), the output `head` judged
    by its supervised tokens per row, the others by their tokens; a weight two Linears share
    stays materialised."""
    rows = batch["input_ids"].shape[0]
    t_body = float(batch["attention_mask"].sum()) / rows
    t_head = float((batch["labels"][:, 1:] != -100).sum()) / rows
    uses: dict = {}
    for s in sites:
        uses[id(s.weight)] = uses.get(id(s.weight), 0) + 1
    out = set()
    for i, s in enumerate(sites):
        m = s.module
        t = t_head if m is head else t_body
        if uses[id(s.weight)] == 1 and (force or prefers_ghost(n, t, m.in_features, m.out_features)):
            out.add(i)
    return out


def rank1(M: torch.Tensor, iters: int = 0):
    """(u, c, relative Frobenius error) with `M ≈ u c^T` for a non-negative `d_out x d_in` matrix.

    From the row and column means, `u = mean_j M_ij`, `c = mean_i M_ij / mean(M)`: exact when M
    has rank 1 (`M = a b^T` gives `a mean(b)` and `b / mean(b)`), three passes over M. `iters`
    alternating least-squares sweeps move it towards the leading singular pair; on 20-step tiny
    runs they did not raise the Spearman correlation with the exact Gram (0.9978 with none).
    """
    u, c, err = rank1_sampled(M, M, None, None)
    tiny = torch.finfo(M.dtype).tiny
    for _ in range(iters):
        u = M @ c / (c @ c).clamp_min(tiny)
        c = M.T @ u / (u @ u).clamp_min(tiny)
    if iters:
        err = fit_error(M, u, c)
    return u.clamp_min(0), c.clamp_min(0), err


def rank1_sampled(Mr, Mc, rows, cols):
    """`rank1` of M from some of its rows `Mr = M[rows, :]` and columns `Mc = M[:, cols]` (None:
    all): `u` from the row means over the sampled columns, `c` from the column means over the
    sampled rows divided by the mean over both. Still exact when M has rank 1 (`M = a b^T` gives
    `u = a mean_cols(b)`, `c = b / mean_cols(b)`), and it never forms M: the adam metric of a
    wide layer costs a pass per coordinate (fwsel.grads.metric.adam_diag_sample). The error is
    measured on the sampled grid `M[rows, cols]`."""
    tiny = torch.finfo(Mr.dtype).tiny
    rows, cols = (None if i is None else i.to(Mr.device) for i in (rows, cols))
    grid = Mr if cols is None else Mr[:, cols]
    u = Mc.mean(1)
    c = Mr.mean(0) / grid.mean().clamp_min(tiny)
    err = fit_error(grid, u if rows is None else u[rows], c if cols is None else c[cols])
    return u.clamp_min(0), c.clamp_min(0), err


def fit_error(M, u, c) -> float:
    """`|M - u c^T| / |M|` without a `d_out x d_in` temporary: `|M|^2 - 2 u.(M c) + |u|^2 |c|^2` in
    float64 scalars (cancellation limits it to ~sqrt(machine eps): a diagnostic)."""
    m2 = float(torch.linalg.vector_norm(M).double() ** 2)
    uu, cc = float(u.double() @ u.double()), float(c.double() @ c.double())
    e2 = m2 - 2 * float(u.double() @ (M @ c).double()) + uu * cc
    return (max(e2, 0.0) / max(m2, 1e-300)) ** 0.5


def fit_adam_rank1(ops, p, optimizer, groups, adam_q: str, metrics) -> torch.Tensor:
    """Set on `ops` (a token-Gram layer of weight `p`) the rank-1 factors of each adam metric in
    `metrics` (adam: D, adam2: D^2), fitted on sampled rows and columns of D: its full D is a few
    passes over every weight. Returns the sample's poor count, scaled to the whole weight."""
    Dr, Dc, rows, cols, poor = adam_diag_sample(p, optimizer, groups, ops.X, adam_q)
    for m in sorted(metrics):
        e = 1 if m == "adam" else 2
        ops.set_rank1(m, *rank1_sampled(Dr**e, Dc**e, rows, cols))
    return poor


class GhostOps:
    """Products for one token-Gram layer from its factors (tokens sorted by row).

    `X` [tokens, d_in], `E` [tokens, d_out], `rows` [tokens] global row ids; rows `< n` are
    the pool, `n..n_all` the target batch.
    """

    def __init__(self, X, E, rows, n: int, n_all: int, chunk: int):
        self.n, self.n_all, self.chunk = n, n_all, max(int(chunk), 1)
        end = int(torch.searchsorted(rows, torch.tensor(n, dtype=rows.dtype, device=rows.device)))
        self.X, self.E, self.rows = X, E, rows  # every row (pool and target)
        self.Xp, self.Ep, self.rp = X[:end], E[:end], rows[:end]  # the pool's tokens come first
        self.d_out, self.d_in = E.shape[1], X.shape[1]
        self.rank1_err: dict = {}
        self._factors: dict = {}

    def weighted_sum(self, coef: torch.Tensor) -> torch.Tensor:
        """`sum_i coef_i G_i` as a flat [d_out * d_in] vector (`coef` per row, zeros skipped)."""
        s = coef.to(self.X)[self.rows]
        keep = s != 0
        E, X = self.E[keep], self.X[keep]
        return ((E * s[keep, None]).T @ X).reshape(-1)

    def set_rank1(self, key, u, c, err) -> None:
        """Use `M ≈ u c^T` for metric `key` (fitted elsewhere, e.g. on sampled coordinates)."""
        self.rank1_err[key] = err
        self._factors[key] = (c.sqrt().to(self.X), u.sqrt().to(self.E))

    def _scaled(self, M, key, every_row=False):
        """Factors scaled by the rank-1 square roots of `M` (factors set for `key` first, else fitted
        to `M`; None and none set: unscaled): the pool's, or with `every_row` those of every row."""
        if key not in self._factors:
            if M is None:
                return (self.X, self.E) if every_row else (self.Xp, self.Ep)
            self.set_rank1(key, *rank1(M.reshape(self.d_out, self.d_in)))
        c, u = self._factors[key]
        return (self.X * c, self.E * u) if every_row else (self.Xp * c, self.Ep * u)

    def gram(self, M=None, key="sgd") -> torch.Tensor:
        """[n, n] `<G_i, M ⊙ G_j>` (float64; rank-1 `M`)."""
        X, E = self._scaled(M, key)
        return token_gram(X, E, self.rp, self.n, self.chunk)

    def gram_all(self, M=None, key="sgd") -> torch.Tensor:
        """[n + v, n + v] `<G_i, M ⊙ G_j>` over every row, pool and target (float64; exact for
        `M = I`, else rank-1 `M`)."""
        X, E = self._scaled(M, key, every_row=True)
        return token_gram(X, E, self.rows, self.n_all, self.chunk)

    def sq_norms(self, M=None, key="sgd") -> torch.Tensor:
        """[n] `<G_i, M ⊙ G_i>` (float64; rank-1 `M`): only same-row token pairs, as two batched
        per-row `[T, T]` Grams of the tokens padded to the longest row (not the masked Gram of
        every token pair: that costs `(n T)^2` pairs for `n T^2`). Rows go in consecutive groups
        whose padded size stays within `chunk` tokens (or one row), so one long row among short
        ones does not pad the whole pool to its length."""
        X, E = self._scaled(M, key)
        counts = torch.bincount(self.rp, minlength=self.n).tolist()
        out = torch.zeros(self.n, dtype=torch.float64, device=X.device)
        r0 = t0 = 0
        for r1, t1 in row_groups(counts, self.chunk):
            Xb, Eb = padded((X[t0:t1], E[t0:t1]), self.rp[t0:t1] - r0, r1 - r0)
            out[r0:r1] = ((Xb @ Xb.transpose(1, 2)) * (Eb @ Eb.transpose(1, 2))).sum((1, 2)).double()
            r0, t0 = r1, t1
        return out

    def dots(self, W: torch.Tensor) -> torch.Tensor:
        """[n, m] `<G_i, W_a>` for the rows of `W` ([m, d_out * d_in]; exact for any metric)."""
        out = torch.zeros(self.n, W.shape[0], dtype=torch.float64, device=self.X.device)
        for a in range(W.shape[0]):
            Wa = W[a].reshape(self.d_out, self.d_in).to(self.Ep)
            for s in range(0, self.Xp.shape[0], self.chunk):
                Xs, Es = self.Xp[s : s + self.chunk], self.Ep[s : s + self.chunk]
                out[:, a].index_add_(0, self.rp[s : s + self.chunk], ((Es @ Wa) * Xs).sum(1).double())
        return out


def row_groups(counts: list[int], chunk: int):
    """(end row, end token) of consecutive row groups whose `rows x longest row` stays within
    `chunk` tokens (a row longer than `chunk` alone)."""
    start, tmax, tok = 0, 0, 0
    for i, c in enumerate(counts):
        if i > start and (i + 1 - start) * max(tmax, c) > chunk:
            yield i, tok
            start, tmax = i, 0
        tmax, tok = max(tmax, c), tok + c
    if counts:
        yield len(counts), tok


def padded(factors, rows, n: int) -> list[torch.Tensor]:
    """Each of `factors` (tokens sorted by row) as [n, T, d]: every row's tokens, zero-padded to
    the longest (the positions computed once for all of them)."""
    counts = torch.bincount(rows, minlength=n)
    pos = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    width = int(counts.max()) if rows.numel() else 0
    out = []
    for F in factors:
        Fb = F.new_zeros(n, width, F.shape[1])
        Fb[rows, pos] = F
        out.append(Fb)
    return out


def token_gram(X, E, rows, n: int, chunk: int) -> torch.Tensor:
    """[n, n] float64 `sum over token pairs (x_t . x_s)(e_t . e_s)` grouped by (row_t, row_s).

    Tokens come sorted by row; blocks of at most `chunk` tokens, the upper triangle mirrored.
    """
    K = torch.zeros(n, n, dtype=torch.float64, device=X.device)
    tok = X.shape[0]
    if 256 <= tok <= chunk:  # two blocks, three products: a quarter less than one
        chunk = -(-tok // 2)
    for a in range(0, tok, chunk):
        Xa, Ea, ra = X[a : a + chunk], E[a : a + chunk], rows[a : a + chunk]
        for b in range(a, tok, chunk):
            rb = rows[b : b + chunk]
            A = (Xa @ X[b : b + chunk].T) * (Ea @ E[b : b + chunk].T)
            part = torch.zeros(n, A.shape[1], dtype=A.dtype, device=A.device).index_add_(0, ra, A)
            blk = torch.zeros(n, n, dtype=A.dtype, device=A.device).index_add_(1, rb, part).double()
            K += blk if b == a else blk + blk.T
    return K
