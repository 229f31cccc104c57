"""Hadamard matrices of (almost) any size a model's hidden width takes, and the rotation built from one.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``, so ``H / √n`` is
orthogonal. Multiplying a vector by it spreads every coordinate evenly over all ``n`` outputs: one
large channel (an activation or weight outlier) becomes ``n`` entries of magnitude ``1/√n`` of it,
which is why QuaRot and SpinQuant rotate the residual stream with one before quantizing.

Orders are built from three classical constructions, combined by Kronecker products
(``H_a ⊗ H_b`` is a Hadamard matrix of order ``a·b``):

* Sylvester: ``H_2 = [[1, 1], [1, -1]]``;
* Paley I, for a prime ``q ≡ 3 (mod 4)``: order ``q + 1``, from the quadratic-residue (Jacobsthal)
  matrix ``Q_ij = χ(j - i)``: ``H = I + [[0, 1ᵀ], [-1, Q]]``;
* Paley II, for a prime ``q ≡ 1 (mod 4)``: order ``2(q + 1)``, from the symmetric
  ``C = [[0, 1ᵀ], [1, Q]]``: ``H = C ⊗ [[1, -1], [-1, -1]] + I ⊗ [[1, 1], [1, -1]]``.

That covers the widths of the models we meet (4096 = 2^12, 576 = 2^4·36, 640 = 2^5·20, 896 =
2^5·28, 1536 = 2^7·12, 3072 = 2^8·12). Where no construction is found, :func:`random_rotation`
falls back to a random orthogonal matrix (Haar, by QR), which also spreads outliers, less evenly.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q_ij = χ(j - i mod q)``, χ the Legendre symbol (0 on the diagonal); (q, q) int64."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if d in residues else -1 for d in range(1, q)], dtype=torch.int64)
    index = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[index]


def _paley_1(q: int) -> torch.Tensor:
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + torch.eye(n, dtype=torch.int64)


def _paley_2(q: int) -> torch.Tensor:
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    a = torch.tensor([[1, -1], [-1, -1]])
    b = torch.tensor([[1, 1], [1, -1]])
    return torch.kron(c, a) + torch.kron(torch.eye(n, dtype=torch.int64), b)


@lru_cache(maxsize=None)
def _construct(n: int) -> torch.Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    if n == 2:
        return torch.tensor([[1, 1], [1, -1]])
    if n % 4:
        return None  # Hadamard orders are 1, 2 or multiples of 4
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley_1(n - 1)
    if _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return _paley_2(n // 2 - 1)
    for a in [2] + list(range(4, int(n**0.5) + 1, 4)):  # the smallest factor first: 2 gives Sylvester
        if n % a == 0:
            left, right = _construct(a), _construct(n // a)
            if left is not None and right is not None:
                return torch.kron(left, right)
    return None


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (int64, entries ±1, ``H Hᵀ = n I``), or None if none is built."""
    built = _construct(n)
    return None if built is None else built.clone()


def random_rotation(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, str]:
    """An orthogonal (n, n) matrix ``R`` and its kind: ``H · diag(s) / √n`` for random signs ``s``
    (a randomised Hadamard rotation, "hadamard"), or a Haar-random orthogonal matrix ("random
    orthogonal") where no Hadamard matrix of order ``n`` is built. Rows of ``R`` are orthonormal:
    ``R Rᵀ = I``."""
    generator = torch.Generator().manual_seed(seed)
    h = hadamard_matrix(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1
        return (h * signs).to(dtype) / n**0.5, "hadamard"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype), "random orthogonal"
