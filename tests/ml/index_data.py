"""Vectors for the index tests: clustered like a catalog's embeddings, keyed like database ids."""
import numpy as np

IDENTITY = "resnet50:1a2b3c4d5e6f"
DIM = 64
APPROX_DIM = 384  # above the 256-d candidate space, so the PCA stage is exercised


def catalog_vectors(n, dim, *, seed=0, clusters=30, photos_per_product=3):
    """Photos of products in categories: a low-rank clustered structure, like real embeddings."""
    rng = np.random.default_rng(seed)
    latent = 48
    projection = rng.standard_normal((latent, dim)) / np.sqrt(latent)
    categories = rng.standard_normal((clusters, latent))
    n_products = max(1, n // photos_per_product)
    products = categories[rng.integers(clusters, size=n_products)] + 0.6 * rng.standard_normal((n_products, latent))
    z = products[np.arange(n) % n_products] + 0.25 * rng.standard_normal((n, latent))
    x = z @ projection + 0.05 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def image_ids(n, start=1000):
    return np.arange(start, start + 7 * n, 7, dtype=np.int64)  # like database ids: not positions
