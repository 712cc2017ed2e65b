"""Small dense linear algebra in pure Python (no numpy, no torch): what the online step-time estimators
(step_models.py) need to keep their recursive-least-squares covariances sane. Matrices are lists of rows."""
from __future__ import annotations


def symmetric_eigen(a: list[list[float]]) -> tuple[list[float], list[list[float]]]:
    """Eigenvalues and eigenvectors (the columns of the second result) of a small symmetric matrix (Jacobi)."""
    n = len(a)
    a = [row[:] for row in a]
    v = [[float(i == j) for j in range(n)] for i in range(n)]
    for _ in range(64):
        off = sum(a[i][j] ** 2 for i in range(n) for j in range(i + 1, n))
        if off <= 1e-30 * sum(a[i][i] ** 2 for i in range(n)) or off == 0.0:
            break
        for p in range(n):
            for q in range(p + 1, n):
                if a[p][q] == 0.0:
                    continue
                theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q])
                t = (1.0 if theta >= 0 else -1.0) / (abs(theta) + (theta * theta + 1.0) ** 0.5)
                c = 1.0 / (t * t + 1.0) ** 0.5
                s = t * c
                for m in (a, v):  # columns p, q of A J and of V J
                    for k in range(n):
                        x, y = m[k][p], m[k][q]
                        m[k][p], m[k][q] = c * x - s * y, s * x + c * y
                for k in range(n):  # rows p, q of J^T (A J)
                    x, y = a[p][k], a[q][k]
                    a[p][k], a[q][k] = c * x - s * y, s * x + c * y
    return [a[i][i] for i in range(n)], v


def bounded_covariance(p: list[list[float]], p0: tuple[float, ...]) -> list[list[float]]:
    """An RLS covariance made symmetric, positive definite and no larger than diag(p0).

    Forgetting divides the covariance by the forgetting factor at every step, so in a direction the steps do
    not excite (a long run of alike decode steps) it grows without bound, and rounding there can leave it
    indefinite: the estimate then diverges (it reached scale 1e6 ten simulated minutes into a chat run). The
    eigenvalues, in coordinates scaled by the prior variances, are kept within [1e-12, 1].
    """
    n = len(p0)
    r = [x ** 0.5 for x in p0]
    q = [[0.5 * (p[i][j] + p[j][i]) / (r[i] * r[j]) for j in range(n)] for i in range(n)]
    lam, v = symmetric_eigen(q)
    lam = [min(1.0, max(1e-12, x)) for x in lam]
    return [[r[i] * r[j] * sum(lam[k] * v[i][k] * v[j][k] for k in range(n)) for j in range(n)] for i in range(n)]
