"""Hadamard matrices of any size that has one by a known construction, and the seeded
random orthogonal matrices built from them (incoherence processing, QuaRot-style).

`hadamard(n)`: a {-1, +1} matrix H with H H^T = n I, float64 [n, n], built as
  * Sylvester's H_2^(x)k when n is a power of two;
  * otherwise n = m * 2^k with m odd: the first p = m * 2^j (j <= k) for which p - 1 is a
    prime q = 3 (mod 4) gives Paley's construction I of order p, and H = Paley_p (x) H_(n/p)
    (e.g. 576 = 72 * 8 with q = 71; 896 = 224 * 4 with q = 223; 1536 = 12 * 128).
Sizes with no such p return None; `random_orthogonal` then uses a seeded random orthogonal
m-block (QR of a Gaussian matrix) instead of Paley's, Kronecker'd with H_(2^k) — orthogonal,
but not a Hadamard matrix (its entries are not all +-1/sqrt(n)).
"""

from __future__ import annotations

import torch


def sylvester(n: int) -> torch.Tensor:
    """H_n for n a power of two (n >= 1), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    d = 2
    while d * d <= q:
        if q % d == 0:
            return False
        d += 1
    return True


def paley(p: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order p = q + 1, q prime, q = 3 (mod 4)."""
    q = p - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley construction I needs p - 1 prime and = 3 mod 4, got p={p}")
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i), skew-symmetric
    s = torch.zeros(p, p, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return torch.eye(p, dtype=torch.float64) + s


def _split(n: int) -> tuple[int, int]:
    """n = m * 2^k with m odd: (m, 2^k)."""
    two = n & -n
    return n // two, two


def _paley_order(n: int) -> int | None:
    """The smallest Paley order p = m * 2^j dividing n (m: n's odd part), or None."""
    m, two = _split(n)
    j = 1
    while j <= two:
        if _is_prime(m * j - 1) and (m * j - 1) % 4 == 3:
            return m * j
        j *= 2
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (float64, entries +-1), or None when neither
    construction above reaches n."""
    if _split(n)[0] == 1:
        return sylvester(n)
    p = _paley_order(n)
    return None if p is None else torch.kron(paley(p), sylvester(n // p))


def construction(n: int) -> str:
    """How `random_orthogonal(n)` builds its matrix, in words (for reports)."""
    m, two = _split(n)
    if m == 1:
        return f"Sylvester H_{n}"
    p = _paley_order(n)
    if p is not None:
        return f"Paley H_{p} (x) Sylvester H_{n // p}"
    return f"random orthogonal {m}x{m} (x) Sylvester H_{two} (no Hadamard construction for {n})"


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Q = diag(random signs) @ H / sqrt(n): orthogonal, float64 [n, n], seeded.
    H is `hadamard(n)`, or a random orthogonal block (x) H_(2^k) when that is None."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    h = hadamard(n)
    if h is None:
        m, two = _split(n)
        block, r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
        block = block * torch.sign(torch.diagonal(r))  # Haar-distributed
        h = torch.kron((block * m ** 0.5).contiguous(), sylvester(two))
    return signs[:, None] * h / n ** 0.5
