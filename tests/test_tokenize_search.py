"""step2 apply's fast code search: the k-d tree search (common.tokenizer.TreeCodeSearch) must give
the codes of the brute-force matmul search that training uses, in Euclidean and cosine mode."""
import numpy as np
import pytest
import torch

import common.tokenizer as tokmod
from common.schema import OBJECTS
from common.tokenizer import ResidualEMAQuantizer, Tokenizer, TreeCodeSearch, build_specs, fit_preprocessing


def clustered(n, dim, seed):
    """Vectors with structure (a mixture of anisotropic blobs), like encoder outputs."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, dim, generator=g) * 2.0
    scales = torch.rand(12, dim, generator=g) + 0.1
    pick = torch.randint(12, (n,), generator=g)
    return centers[pick] + scales[pick] * torch.randn(n, dim, generator=g)


@pytest.mark.parametrize("cosine", [False, True])
def test_tree_search_returns_bruteforce_codes(cosine):
    torch.manual_seed(0)
    q = ResidualEMAQuantizer(levels=4, size=512, dim=8, cosine=cosine)
    q.kmeans_init(clustered(8_000, 8, 1), iters=3, generator=torch.Generator().manual_seed(2))
    if cosine:  # codes off the unit sphere: the lift must still reproduce argmax x.C_k
        q.codebooks.mul_(torch.rand(4, 512, 1) + 0.5)
    z = clustered(20_000, 8, 3)
    with torch.inference_mode():
        brute = q.quantize(z)[1].numpy()
    tree = TreeCodeSearch(q.codebooks, cosine).codes(z.numpy(), workers=1)
    assert tree.dtype == np.int32 and tree.shape == brute.shape
    agree = (tree == brute).all(1).mean()
    assert agree >= 0.9999, f"tree codes agree with brute force on {agree:.6f} of vectors"
    assert len(np.unique(brute[:, 0])) > 100  # a real test: many codes in use, not one


def small_tokenizer(levels=3, size=256):
    feats = [OBJECTS["jets"].feature(n) for n in ("pt", "eta", "phi", "mass")]
    specs = build_specs(feats)
    rng = np.random.default_rng(0)
    n = 20_000
    sample = {"pt": rng.exponential(40.0, n) + 20.0, "eta": rng.uniform(-2.5, 2.5, n),
              "phi": rng.uniform(-np.pi, np.pi, n), "mass": rng.exponential(8.0, n)}
    fit_preprocessing(specs, sample)
    torch.manual_seed(0)
    tok = Tokenizer("jets", specs, {"dim": 8, "levels": levels, "codebook_size": size, "hidden": 32, "depth": 2,
                                    "decay": 0.99, "cosine": False, "dead_fraction": 0.03})
    with torch.no_grad():
        z = tok.model.encoder(torch.from_numpy(tok.preprocess(sample)))
        tok.model.quantizer.kmeans_init(z, iters=5, generator=torch.Generator().manual_seed(1))
    return tok, sample


def test_encode_fast_path_equals_training_search_and_follows_codebook_changes(monkeypatch):
    tok, sample = small_tokenizer()
    fast = tok.encode(sample)
    monkeypatch.setattr(tokmod, "TREE_SEARCH_ON_CPU", False)
    slow = tok.encode(sample)
    assert (fast == slow).all(1).mean() >= 0.9999
    # codebooks changed after the first encode (training resumed): the cached trees must follow
    monkeypatch.setattr(tokmod, "TREE_SEARCH_ON_CPU", True)
    with torch.no_grad():
        tok.model.quantizer.codebooks[0] = tok.model.quantizer.codebooks[0].flip(0)
    fast2 = tok.encode(sample)
    monkeypatch.setattr(tokmod, "TREE_SEARCH_ON_CPU", False)
    slow2 = tok.encode(sample)
    assert (fast2 == slow2).all(1).mean() >= 0.9999
    assert not np.array_equal(fast2[:, 0], fast[:, 0])  # the flip did move the level-0 codes
