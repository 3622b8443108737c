"""Fits the float tanh of the CPU attention softcap (csrc/cpu/attention.cpp `fast_tanh`) and checks it.

tanh(x) ~ x P(x^2) / Q(x^2) on [0, B] with P of degree 6 and Q of degree 3 in x^2 (P(0) = Q(0) = 1),
minimising the largest relative error by iteratively reweighted least squares (Lawson's method) on
the linearised problem x P - tanh(x) Q = 0. Prints the float32 coefficients in the kernel's order and
the error of the float32 evaluation (the kernel's Horner order, FMA) against float64 tanh, in ulp.

    python tools/fit_tanh.py [B]      # B = 8 gives the kernel's coefficients
"""

import sys

import numpy as np

P_TERMS, Q_TERMS = 7, 4  # coefficients of P and Q in x^2, constant terms included


def fit(bound, iterations=200):
    x = np.sort(np.concatenate([np.linspace(1e-4, bound, 20000), np.geomspace(1e-6, 1e-1, 2000)]))
    t = np.tanh(x)
    u = (x / bound) ** 2  # the scaled variable keeps the monomials well conditioned
    # unknowns p_0..p_6 and q_1..q_3 (q_0 = 1), each row divided by tanh(x): relative error
    design = np.hstack(
        [x[:, None] * u[:, None] ** np.arange(P_TERMS), -t[:, None] * u[:, None] ** np.arange(1, Q_TERMS)]
    )
    design /= t[:, None]
    weights = np.ones_like(x)
    for _ in range(iterations):
        c, *_ = np.linalg.lstsq(design * weights[:, None], weights, rcond=None)
        p, q = c[:P_TERMS], np.concatenate([[1.0], c[P_TERMS:]])
        err = np.abs(x * np.polyval(p[::-1], u) / np.polyval(q[::-1], u) / t - 1)
        weights *= np.sqrt(err / err.max()) + 1e-12
        weights /= weights.max()
    scale = bound ** (2 * np.arange(max(P_TERMS, Q_TERMS)))
    return (p / scale[:P_TERMS]).astype(np.float32), (q / scale[:Q_TERMS]).astype(np.float32)


def evaluate_float32(x, p, q, bound):
    """The kernel's evaluation: clamp, Horner with FMA (exact product and sum, one rounding), p * c / q."""

    def fma(a, b, c):
        return (a.astype(np.float64) * b + c).astype(np.float32)

    c = np.clip(x, -np.float32(bound), np.float32(bound)).astype(np.float32)
    c2 = c * c
    num = np.full_like(c, p[-1])
    for a in p[-2::-1]:
        num = fma(num, c2, np.float32(a))
    den = np.full_like(c, q[-1])
    for a in q[-2::-1]:
        den = fma(den, c2, np.float32(a))
    return (num * c) / den


def main():
    bound = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0
    p, q = fit(bound)
    rng = np.random.default_rng(0)
    tiny = np.geomspace(1e-30, 1, 100000)
    x = np.concatenate([rng.uniform(-12, 12, 2_000_000), rng.uniform(-1, 1, 1_000_000), tiny, -tiny]).astype(np.float32)
    ref = np.tanh(x.astype(np.float64))
    got = evaluate_float32(x, p, q, bound).astype(np.float64)
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    err = np.abs(got - ref) / ulp
    print("P (x^0, x^2, ... x^12):", ", ".join(f"{a:.9e}" for a in p))
    print("Q (x^0, x^2, x^4, x^6):", ", ".join(f"{a:.9e}" for a in q))
    print(f"float32 error: max {err.max():.2f} ulp (at x = {x[err.argmax()]:.6g}), mean {err.mean():.2f} ulp")
    print(f"largest |tanh|: {np.abs(got).max():.9g}")


if __name__ == "__main__":
    main()
