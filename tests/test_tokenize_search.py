"""The compiled nearest-code search (common.code_search) that encode, apply and CPU training use
must return the brute-force nearest code: exact, first on ties, in Euclidean and cosine mode, for
latent dimensions that are and are not multiples of its 8-wide chunks."""
import numpy as np
import pytest
import torch

import common.tokenizer as tokmod
from common.code_search import nearest_codes
from common.schema import OBJECTS
from common.tokenizer import ResidualEMAQuantizer, Tokenizer, build_specs, fit_preprocessing


def clustered(n, dim, seed):
    """Vectors with structure (a mixture of anisotropic blobs), like encoder outputs."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, dim, generator=g) * 2.0
    scales = torch.rand(12, dim, generator=g) + 0.1
    pick = torch.randint(12, (n,), generator=g)
    return centers[pick] + scales[pick] * torch.randn(n, dim, generator=g)


def brute_force(x, codebook, cosine):
    x, cb = x.astype(np.float64), codebook.astype(np.float64)
    score = -(x @ cb.T) if cosine else ((x[:, None, :] - cb[None]) ** 2).sum(2)
    return score.argmin(1)


@pytest.mark.parametrize("dim,k,cosine", [(8, 1000, False), (3, 77, False), (12, 333, False), (8, 500, True),
                                          (17, 64, True)])
def test_nearest_codes_equal_brute_force(dim, k, cosine):
    x = clustered(3_000, dim, 1).numpy()
    cb = clustered(k, dim, 2).numpy()
    if cosine:  # unit queries (as the quantizer normalises them), codes of any length
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    codes = nearest_codes(x, cb, cosine)
    assert codes.dtype == np.int32 and codes.shape == (len(x),)
    agree = (codes == brute_force(x, cb, cosine)).mean()
    assert agree >= 0.999, f"compiled search agrees with brute force on {agree:.5f} of vectors"
    assert len(np.unique(codes)) > min(k, 3_000) // 10  # many codes in use: a real test


def test_ties_non_finite_and_threads():
    rng = np.random.default_rng(0)
    cb = rng.normal(size=(40, 8)).astype(np.float32)
    cb[25] = cb[7]  # a duplicated code: argmin's answer is the first one
    x = np.vstack([cb[7:8] + 1e-3, np.full((1, 8), np.nan, np.float32), rng.normal(size=(5_000, 8))]).astype(np.float32)
    codes = nearest_codes(x, cb)
    assert codes[0] == 7 and codes[1] == 0  # a NaN vector gets code 0, as torch.argmin gives it
    assert (codes != 25).all()
    assert np.array_equal(nearest_codes(x, cb, threads=1), codes)
    with pytest.raises(ValueError, match="dimension"):
        nearest_codes(x[:, :5], cb)


@pytest.mark.parametrize("cosine", [False, True])
def test_quantizer_codes_equal_the_matmul_search(monkeypatch, cosine):
    torch.manual_seed(0)
    q = ResidualEMAQuantizer(levels=4, size=512, dim=8, cosine=cosine)
    q.kmeans_init(clustered(8_000, 8, 1), iters=3, generator=torch.Generator().manual_seed(2))
    z = clustered(20_000, 8, 3)
    with torch.inference_mode():
        compiled = q.quantize(z)[1]
        monkeypatch.setattr(tokmod, "COMPILED_SEARCH_ON_CPU", False)
        matmul = q.quantize(z)[1]
    agree = (compiled == matmul).all(1).float().mean().item()
    assert agree >= 0.9999, f"all 4 levels agree on {agree:.6f} of vectors"
    assert len(np.unique(matmul[:, 0])) > 100


def test_encode_equals_training_search(monkeypatch):
    feats = [OBJECTS["jets"].feature(n) for n in ("pt", "eta", "phi", "mass")]
    specs = build_specs(feats)
    rng = np.random.default_rng(0)
    n = 20_000
    sample = {"pt": rng.exponential(40.0, n) + 20.0, "eta": rng.uniform(-2.5, 2.5, n),
              "phi": rng.uniform(-np.pi, np.pi, n), "mass": rng.exponential(8.0, n)}
    fit_preprocessing(specs, sample)
    torch.manual_seed(0)
    tok = Tokenizer("jets", specs, {"dim": 8, "levels": 3, "codebook_size": 256, "hidden": 32, "depth": 2,
                                    "decay": 0.99, "cosine": False, "dead_fraction": 0.03})
    with torch.no_grad():
        z = tok.model.encoder(torch.from_numpy(tok.preprocess(sample)))
        tok.model.quantizer.kmeans_init(z, iters=5, generator=torch.Generator().manual_seed(1))
    fast = tok.encode(sample)
    with torch.no_grad():
        whole = tok.model.quantizer.quantize(z)[1].numpy()  # the encoder in one batch, not encode's cache-sized ones
    assert (fast == whole).all(1).mean() >= 0.9999
    monkeypatch.setattr(tokmod, "COMPILED_SEARCH_ON_CPU", False)
    assert (fast == tok.encode(sample)).all(1).mean() >= 0.9999
