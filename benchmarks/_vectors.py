"""Synthetic embeddings for the index benchmarks: a catalog's photos, and hard noisy clusters.

Real-like: categories, products within them and several photos of each product, drawn in a latent
space whose variance decays like a power law (as CNN feature spectra do), mapped into ``dim`` with a
shared positive offset (post-ReLU features all point roughly one way), plus a little isotropic noise so
the vectors are full rank. Hard: cluster centres plus Gaussian noise of half the centre's norm, so
neighbours inside a cluster are hard to tell apart (what the index's self-check must not serve blindly).
"""
from __future__ import annotations

import numpy as np


class CatalogPhotos:
    """Photos of ``n_products`` products; ``photos(products)`` draws a new photo of each product given."""

    def __init__(self, n: int, dim: int, *, images_per_product: int = 3, products_per_category: int = 50,
                 latent_dim: int = 384, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        self.n_products = max(1, n // images_per_product)
        n_categories = max(1, self.n_products // products_per_category)
        self.latent_dim = latent_dim
        self.spectrum = np.sqrt(1.0 / np.arange(1, latent_dim + 1)).astype(np.float32)
        self.projection = (self.rng.standard_normal((latent_dim, dim)) / np.sqrt(dim)).astype(np.float32)
        self.offset = np.abs(self.rng.standard_normal(dim)).astype(np.float32) * 0.6 / np.sqrt(dim)
        categories = self._latent(n_categories, 1.0)
        self.products = categories[self.rng.integers(n_categories, size=self.n_products)] + \
            self._latent(self.n_products, 0.6)

    def _latent(self, rows: int, scale: float) -> np.ndarray:
        return self.rng.standard_normal((rows, self.latent_dim)).astype(np.float32) * self.spectrum * scale

    def photos(self, products: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((len(products), self.dim), dtype=np.float32) if out is None else out
        for start in range(0, len(products), 20_000):
            rows = products[start : start + 20_000]
            z = self.products[rows] + self._latent(len(rows), 0.25)
            noise = self.rng.standard_normal((len(rows), self.dim)).astype(np.float32) * (0.15 / np.sqrt(self.dim))
            block = z @ self.projection + self.offset + noise
            out[start : start + len(rows)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out


class NoisyClusters:
    """Members of ``n_products`` clusters; ``photos(clusters)`` draws a new member of each cluster given."""

    def __init__(self, n: int, dim: int, *, per_cluster: int = 100, noise: float = 0.5, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        self.n_products = max(1, n // per_cluster)
        centres = self.rng.standard_normal((self.n_products, dim)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.noise = noise

    def photos(self, products: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((len(products), self.dim), dtype=np.float32) if out is None else out
        for start in range(0, len(products), 20_000):
            rows = products[start : start + 20_000]
            block = self.centres[rows] + self.rng.standard_normal((len(rows), self.dim)).astype(np.float32) * (
                self.noise / np.sqrt(self.dim))
            out[start : start + len(rows)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out


def catalog_embeddings(n: int, dim: int, *, n_queries: int = 0, seed: int = 0, **shape) -> tuple[np.ndarray, np.ndarray]:
    """``n`` catalog vectors and ``n_queries`` query vectors (new photos of random products)."""
    catalog = CatalogPhotos(n, dim, seed=seed, **shape)
    vectors = catalog.photos(np.arange(n) % catalog.n_products)
    queries = catalog.photos(catalog.rng.integers(catalog.n_products, size=n_queries))
    return vectors, queries
