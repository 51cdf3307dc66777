"""The diffusion math and the metrics against values computed here by hand, in float64, from the betas alone:
each test pins one formula tightly enough that a plausible slip in it (a flipped sign, a missing square root,
a swapped argument, a step off by one) fails it. tests/mutants.py plants those slips."""

import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from dalle2.diffusion import GaussianDiffusion
from dalle2.metrics import (InceptionFeatures, bootstrap_se, clip_score, cmmd, frechet_distance, image_distances,
                            kernel_distance, kid_subset_size, r_precision, r_precision_sampled)
from dalle2.schedules import cosine_betas

T = 10


def schedule(timesteps: int = T) -> dict[str, np.ndarray]:
    """Every quantity of the process, from the betas, by the textbook formulas (Ho et al. 2020)."""
    betas = cosine_betas(timesteps)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return dict(betas=betas, abar=abar, abar_prev=abar_prev,
                post_var=betas * (1 - abar_prev) / (1 - abar),
                coef_x0=betas * np.sqrt(abar_prev) / (1 - abar),
                coef_xt=(1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar))


def std_normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def test_the_posterior_is_the_textbook_one_at_every_step():
    d, s = GaussianDiffusion(timesteps=T), schedule()
    x0, x_t = torch.full((T, 1), 0.6), torch.full((T, 1), -0.3)
    mean, var, _ = d.q_posterior(x0, x_t, torch.arange(T))
    np.testing.assert_allclose(mean[:, 0].double().numpy(), s["coef_x0"] * 0.6 - s["coef_xt"] * 0.3, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[:, 0].double().numpy(), s["post_var"], rtol=1e-5, atol=1e-9)


def model_terms(s: dict, t: int, x0: np.ndarray, x_t: np.ndarray, eps: np.ndarray, v: np.ndarray):
    """The model's posterior mean and log variance for an eps prediction and variance output v (Nichol &
    Dhariwal 2021: v in [-1, 1] moves the log variance from the clipped posterior's to log beta)."""
    x0_pred = (x_t - np.sqrt(1 - s["abar"][t]) * eps) / np.sqrt(s["abar"][t])
    mean = s["coef_x0"][t] * x0_pred + s["coef_xt"][t] * x_t
    low = np.log(s["post_var"][1] if t == 0 else s["post_var"][t])
    frac = (v + 1) / 2
    return mean, frac * np.log(s["betas"][t]) + (1 - frac) * low


@pytest.mark.parametrize("t", [1, 4, 9])
def test_the_variational_bound_is_the_gaussian_kl_in_bits(t):
    d, s = GaussianDiffusion(timesteps=T, learned_variance=True), schedule()
    rng = np.random.default_rng(t)
    x0, x_t, eps = rng.uniform(-1, 1, (2, 6)), rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    v = rng.uniform(-1, 1, (2, 6))
    true_mean = s["coef_x0"][t] * x0 + s["coef_xt"][t] * x_t
    true_log_var = np.log(s["post_var"][t])
    mean, log_var = model_terms(s, t, x0, x_t, eps, v)
    # KL(q || p) of two Gaussians, averaged over dimensions, in bits
    kl = 0.5 * (log_var - true_log_var + np.exp(true_log_var - log_var) + (true_mean - mean) ** 2 / np.exp(log_var) - 1)
    expected = kl.mean(1) / math.log(2)
    f = lambda a: torch.from_numpy(a).float()  # noqa: E731
    got = d.vb_terms(f(eps), f(v), f(x0), f(x_t), torch.full((2,), t))
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_the_bound_at_t0_is_the_discretised_gaussian_nll_in_bits():
    d, s = GaussianDiffusion(timesteps=T, learned_variance=True), schedule()
    x0 = np.array([[-1.0, -0.5, 0.0, 0.3, 1.0, 0.9]])  # both edges (open-ended bins) and the inside
    x_t = np.array([[-0.9, -0.45, 0.02, 0.31, 0.97, 0.88]])
    eps, v = np.zeros((1, 6)), np.array([[-1.0, -0.5, 0.0, 0.5, 1.0, 0.2]])
    mean, log_var = model_terms(s, 0, x0, x_t, eps, v)
    scale = np.exp(0.5 * log_var)  # the standard deviation: half the log variance
    upper, lower = std_normal_cdf((x0 + 1 / 255 - mean) / scale), std_normal_cdf((x0 - 1 / 255 - mean) / scale)
    probability = np.where(x0 < -0.999, upper, np.where(x0 > 0.999, 1 - lower, upper - lower))
    expected = -np.log(np.maximum(probability, 1e-12)).mean(1) / math.log(2)
    f = lambda a: torch.from_numpy(a).float()  # noqa: E731
    got = d.vb_terms(f(eps), f(v), f(x0), f(x_t), torch.zeros(1, dtype=torch.long))
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-3)  # the CDF is tanh's approximation


def test_the_bound_is_smallest_and_flat_at_the_exact_variance():
    # with the exact mean, KL(q || p) is zero, and stationary, where p's variance is the posterior's: v = -1 for
    # t >= 2 (there the clipped posterior variance is the posterior's own)
    d, t = GaussianDiffusion(timesteps=T, learned_variance=True), 5
    x0, noise = torch.rand(1, 8) * 2 - 1, torch.randn(1, 8)
    tt = torch.full((1,), t)
    x_t = d.q_sample(x0, tt, noise)
    exact_eps = d.eps_from_x0(x_t, tt, x0)
    v = torch.tensor([-1.0, -0.5, 0.0, 0.5]).repeat_interleave(2).reshape(1, 8).requires_grad_()
    bound = d.vb_terms(exact_eps, v, x0, x_t, tt)
    (grad,) = torch.autograd.grad(bound.sum(), v)
    assert bound.item() > 0
    assert grad[0, :2].abs().max() < 1e-5 and (grad[0, 2:] > 0).all(), grad
    at_exact = d.vb_terms(exact_eps, torch.full((1, 8), -1.0), x0, x_t, tt)
    assert at_exact.abs().item() < 1e-5


def test_repaint_pastes_the_known_region_noised_to_the_step_being_taken():
    # what the model sees in the known region at step t is the known image noised to level t: N(sqrt(abar_t) a,
    # 1 - abar_t), on every resampling pass (not the clean image, not level t - 1)
    d, s = GaussianDiffusion(timesteps=T), schedule()
    n, known_value = 20000, 0.8
    image = torch.full((n, 2), known_value)
    mask = torch.tensor([True, False]).expand(n, 2)
    seen: list[tuple[int, torch.Tensor]] = []

    def model_fn(x, t):
        seen.append((int(t[0]), x[:, 0].clone()))
        return torch.zeros_like(x)

    d.sample(model_fn, (n, 2), inpaint_image=image, inpaint_mask=mask, inpaint_resample_times=2,
             generator=torch.Generator().manual_seed(0))
    assert [t for t, _ in seen] == [t for t in reversed(range(T)) for _ in range(2)]
    for t, known in seen:
        mean, var = math.sqrt(s["abar"][t]) * known_value, 1 - s["abar"][t]
        assert abs(known.mean().item() - mean) < 5 * math.sqrt(var / n), (t, known.mean().item(), mean)
        assert abs(known.var().item() - var) < 0.05 * var + 1e-4, (t, known.var().item(), var)


@pytest.mark.parametrize("t, t_prev", [(9, 8), (5, 4), (9, 3), (6, 0)])
def test_a_ddim_step_at_eta_1_adds_the_posterior_noise_between_its_two_steps(t, t_prev):
    d, s = GaussianDiffusion(timesteps=T), schedule()
    n = 40000
    a, a_prev = s["abar"][t], s["abar"][t_prev]
    sigma2 = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    if t_prev == t - 1:
        assert sigma2 == pytest.approx(s["post_var"][t], rel=1e-9)  # consecutive steps: the posterior variance
    x = torch.full((n, 1), 0.4)
    eps = torch.full((n, 1), -0.7)
    step = lambda eta, seed: d.ddim_step(lambda xx, tt: eps, x, t, t_prev, eta=eta,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed))[0]
    x0 = (0.4 - math.sqrt(1 - a) * -0.7) / math.sqrt(a)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma2) * -0.7
    noisy = step(1.0, 0)
    assert abs(noisy.mean().item() - mean) < 5 * math.sqrt(sigma2 / n) + 1e-5
    assert noisy.var().item() == pytest.approx(sigma2, rel=0.03)
    # eta = 0: no noise, and the direction takes all of 1 - abar_prev
    deterministic = step(0.0, 1)
    assert (deterministic == deterministic[0]).all()
    assert deterministic[0].item() == pytest.approx(math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * -0.7, rel=1e-5)


def test_cmmd_is_the_gaussian_kernel_mmd_of_normalised_embeddings():
    # unit vectors e1, e2 and e1, e1 (given at other lengths: CMMD normalises): |e1 - e2|^2 = 2, k = exp(-2 / 2 s^2)
    x, y = torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.5, 0.0], [4.0, 0.0]])
    k = math.exp(-2 / (2 * 10.0**2))
    # mean k(x, x) = (1 + k) / 2, mean k(y, y) = 1, mean k(x, y) = (1 + k) / 2
    assert cmmd(x, y) == pytest.approx(1000 * ((1 + k) / 2 + 1 - 2 * (1 + k) / 2), rel=1e-4)
    assert cmmd(x, y, sigma=1.0, scale=1.0) == pytest.approx((1 - math.exp(-1)) / 2, rel=1e-4)
    assert cmmd(x, x) == pytest.approx(0, abs=1e-4)


def test_unbiased_cmmd_leaves_out_each_sets_own_diagonal_and_reads_zero_on_one_distribution():
    # x = e1, e2, -e1; y = e1, e1: squared distances 2 (k2) and 4 (k4) between distinct unit vectors
    x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    k2, k4 = math.exp(-2 / 200), math.exp(-4 / 200)
    # within x: off-diagonal mean (2 k2 + k4) / 3; within y: 1; across: (1 + k2 + k4) / 3
    assert cmmd(x, y, unbiased=True) == pytest.approx(1000 * (1 - k4) / 3, rel=1e-4)
    assert cmmd(x, y) == pytest.approx(1000 * (6 - 2 * k2 - 4 * k4) / 9, rel=1e-4)  # whole matrices, diagonal in
    # two samples of 8 from one distribution, 300 times: the paper's figure sits above 0, the unbiased one around it
    generator = torch.Generator().manual_seed(0)
    biased, unbiased = [], []
    for _ in range(300):
        a, b = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
        biased.append(cmmd(a, b, sigma=1.0))
        unbiased.append(cmmd(a, b, sigma=1.0, unbiased=True))
    biased, unbiased = torch.tensor(biased), torch.tensor(unbiased)
    standard_error = unbiased.std() / math.sqrt(len(unbiased))
    assert abs(unbiased.mean()) < 3 * standard_error and (unbiased < 0).any()
    assert biased.min() > 0 and biased.mean() > 10 * standard_error


def test_clip_score_is_100_times_the_cosine_clamped_at_zero_and_r_precision_counts_first_ranks():
    images = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    texts = torch.tensor([[0.5, math.sqrt(3) / 2], [-0.5, math.sqrt(3) / 2]])  # cosines 0.5 and -0.5
    assert clip_score(images, texts) == pytest.approx((50 + 0) / 2, rel=1e-5)
    # a long prompt vector that would win on dot products: ranks are by cosine
    prompts = torch.tensor([[1.0, 0.0], [0.5, 5.0], [-1.0, 0.0]])
    image_embed = torch.tensor([[1.0, 0.3], [0.0, 1.0], [0.0, 1.0], [-1.0, -0.2]])
    # images 0, 1, 3 rank their own prompt first; image 2 (own prompt 0) does not
    assert r_precision(image_embed, prompts, torch.tensor([0, 1, 0, 2])) == pytest.approx(0.75)


def test_sampled_r_precision_is_one_for_exact_matches_and_a_known_half_for_planted_wrong_captions():
    # orthonormal captions; images 0-3 are their own caption, images 4-7 lean twice as far towards the next caption
    # (cosines 1/sqrt 5 to the true one, 2/sqrt 5 to the wrong one, 0 to the rest)
    captions, true_index = torch.eye(10), torch.arange(8)
    exact = r_precision_sampled(captions[true_index], captions, true_index)
    assert exact == {"r_precision": 1.0, "r_precision_se": 0.0, "r_precision_chance": 0.1, "r_precision_candidates": 10}
    images = captions[true_index].clone()
    images[4:] += 2 * captions[true_index[4:] + 1]
    # all 9 others are drawn (99 > 9): every leaning image misses, every time
    half = r_precision_sampled(images, captions, true_index)
    assert half["r_precision"] == 0.5
    # per-image hit rates 1,1,1,1,0,0,0,0: sample std sqrt(8 x 0.25 / 7), over sqrt(8) images
    assert half["r_precision_se"] == pytest.approx(math.sqrt(1 / 28), rel=1e-9)
    # 3 distinct distractors of the 9 others: the wrong caption is among them with probability 3/9, so a leaning
    # image hits 2/3 of the time (drawn with replacement it would be 1 - (8/9)^3 = 0.30: a mean of 0.851)
    drawn = r_precision_sampled(images, captions, true_index, distractors=3, repeats=2000)
    assert drawn["r_precision_chance"] == 0.25 and drawn["r_precision_candidates"] == 4
    theory_se = math.sqrt(2 / 3 * 1 / 3 / (4 * 2000)) / 2
    assert abs(drawn["r_precision"] - 5 / 6) < 4 * theory_se, drawn


def test_sampled_r_precision_chance_never_draws_the_true_caption_and_counts_ties_as_misses():
    generator = torch.Generator().manual_seed(0)
    images, captions = torch.randn(300, 32, generator=generator), torch.randn(150, 32, generator=generator)
    unrelated = r_precision_sampled(images, captions, torch.arange(300) % 150, seed=3)
    assert unrelated["r_precision_chance"] == 1 / 100 and unrelated["r_precision_candidates"] == 100
    assert abs(unrelated["r_precision"] - 1 / 100) < 4 * unrelated["r_precision_se"], unrelated
    assert r_precision_sampled(images[:5], captions[:40], torch.arange(5))["r_precision_chance"] == 1 / 40
    assert r_precision_sampled(images, captions, torch.arange(300) % 150, seed=3) == unrelated  # seeded
    # a pool of 2: the one distractor is the other caption, every time (the true one drawn would tie: a miss)
    pair = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    own = r_precision_sampled(pair, pair, torch.tensor([0, 1]), repeats=50)
    assert own["r_precision"] == 1.0 and own["r_precision_candidates"] == 2 and own["r_precision_chance"] == 0.5
    # equally close to both captions: no outright win
    assert r_precision_sampled(torch.tensor([[1.0, 1.0]]), pair, torch.tensor([0]))["r_precision"] == 0.0
    with pytest.raises(ValueError, match="at least 2 distinct captions"):
        r_precision_sampled(pair[:1], pair[:1], torch.tensor([0]))


def exact_sample(n: int, mean: np.ndarray, var: np.ndarray, seed: int) -> torch.Tensor:
    """n points whose sample mean is `mean` and sample covariance (ddof 1) is diag(`var`), to rounding."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(0)
    whiten = np.linalg.inv(np.linalg.cholesky(z.T @ z / (n - 1))).T  # Cholesky factor L: z L^-T has covariance I
    return torch.from_numpy(mean + (z @ whiten) * np.sqrt(var))


def test_frechet_distance_is_the_closed_form_between_fitted_gaussians():
    # diagonal covariances: |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2)), with means far from 0 (torchmetrics takes
    # the covariance as a difference of sums of squares)
    mu1, mu2 = np.array([100.0, 101.0, 99.0, 100.5]), np.array([100.5, 100.0, 99.0, 102.0])
    s1, s2 = np.array([0.04, 0.09, 0.01, 0.25]), np.array([0.16, 0.01, 0.01, 0.04])
    x, y = exact_sample(50, mu1, s1, seed=0), exact_sample(70, mu2, s2, seed=1)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    # full covariances, with scipy's matrix square root
    rng = np.random.default_rng(2)
    a = rng.standard_normal((40, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((60, 5)) @ rng.standard_normal((5, 5)) + 0.5
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    full = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(full, rel=1e-5)


def test_kernel_distance_is_the_unbiased_cubic_kernel_mmd_and_reads_zero_on_one_distribution():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 0.7
    k = lambda a, b: (a @ b.T / 3 + 1) ** 3  # noqa: E731 - KID's kernel, degree 3, gamma 1/d, coefficient 1
    off_diagonal = lambda m: (m.sum() - np.trace(m)) / (6 * 5)  # noqa: E731
    expected = off_diagonal(k(x, x)) + off_diagonal(k(y, y)) - 2 * k(x, y).mean()
    # subset size 1000 clipped to the 6 there are: every subset is the whole set, so every estimate is the same
    # (to float64's precision: the estimate is a small difference of kernel sums)
    mean, std = kernel_distance(torch.from_numpy(x), torch.from_numpy(y))
    assert mean == pytest.approx(expected, rel=1e-9) and std == pytest.approx(0, abs=1e-12)
    # two samples of one distribution around 0, of different ones above it; the caller's RNG is left alone
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 8, generator=generator), torch.randn(150, 8, generator=generator)
    torch.manual_seed(7)
    same = kernel_distance(a, b, subsets=50, subset_size=50)
    after = torch.rand(1)
    torch.manual_seed(7)
    assert torch.rand(1) == after
    assert abs(same[0]) < 3 * same[1] and same[1] > 0, same
    assert kernel_distance(a, b, subsets=50, subset_size=50) == same  # seeded
    apart = kernel_distance(a, b + 1, subsets=50, subset_size=50)
    assert apart[0] > 3 * apart[1], apart
    assert kernel_distance(a[:9], b[:5], subsets=5)[1] > 0  # clipped to the smaller set: 5 of 9 vary


def test_bootstrap_se_resamples_both_sets():
    # the bootstrap spread of a difference of means is sqrt(var_x / n + var_y / m), population variances
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, generator=generator, dtype=torch.float64), 3 * torch.randn(30, 1, generator=generator,
                                                                                            dtype=torch.float64)
    expected = math.sqrt(x.var(unbiased=False).item() / 40 + y.var(unbiased=False).item() / 30)
    difference = lambda a, b: (a.mean() - b.mean()).item()  # noqa: E731
    assert bootstrap_se(difference, x, y, rounds=2000) == pytest.approx(expected, rel=0.08)
    assert bootstrap_se(frechet_distance, x.repeat(1, 3), y.repeat(1, 3), rounds=5) > 0
    same_x, same_y = torch.tensor([[1.0, 2.0, 0.5]]).repeat(20, 1), torch.tensor([[0.0, 1.0, 0.25]]).repeat(25, 1)
    assert bootstrap_se(frechet_distance, same_x, same_y, rounds=5) == pytest.approx(0, abs=1e-12)


def test_image_distances_report_fd_its_noise_and_kid_under_a_prefix():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(30, 4, generator=generator), torch.randn(20, 4, generator=generator) + 0.5
    got = image_distances(real, fake, prefix="clip_", bootstraps=5)
    kid, kid_std = kernel_distance(real, fake, subset_size=10)  # half the smaller set: subsets that differ
    assert kid_std > 0 and kid_subset_size(30, 20) == 10 and kid_subset_size(5000, 3000) == 1000
    assert got == {"clip_fd": frechet_distance(real, fake),
                   "clip_fd_se": bootstrap_se(frechet_distance, real, fake, rounds=5),
                   "clip_kid": kid, "clip_kid_std": kid_std}
    with pytest.raises(ValueError, match="got 30 real and 1 fake"):
        image_distances(real, fake[:1], prefix="")


class Tripwire:
    """An object a weights file must not bring to life."""

    built: list = []

    def __init__(self):
        self.payload = "anything"  # state to restore: unpickling calls __setstate__ with it

    def __setstate__(self, state):
        Tripwire.built.append(state)


@pytest.fixture(scope="module")
def random_inception():
    """torch-fidelity's FID Inception v3, randomly initialised: no weights fetched (none can be here)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    class Random(fidelity.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            pass  # keep the random initialisation

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        torch.manual_seed(0)
        network = Random("inception-v3-compat", ["2048"])
    for module in network.modules():  # He initialisation: features of order 1 that a changed pixel moves
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return network


def test_inception_features_are_the_fid_extractors_own_from_a_checked_weights_file(random_inception, tmp_path):
    path = tmp_path / "inception.pth"
    torch.save(random_inception.state_dict(), path)
    loads = []  # every torch.load: only our copy of checked tensors may be unpickled (weights_only=False)
    real_load = torch.load

    def load(source, *args, **kwargs):
        loads.append((source, kwargs.get("weights_only")))
        return real_load(source, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "load", load)
        features = InceptionFeatures(str(path))
    unpickled = [str(source) for source, weights_only in loads if not weights_only]
    assert unpickled and str(path) not in unpickled and not any(os.path.exists(copy) for copy in unpickled), loads
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = (pixels.float() + 0.5) / 255  # halfway into each byte's bin, so truncating to bytes gives `pixels`
    images[:, :, 0, 0], pixels[:, :, 0, 0] = 1.7, 255  # out of range: clamped first, as torchmetrics' bytes
    images[:, :, 1, 1], pixels[:, :, 1, 1] = -0.3, 0
    with torch.no_grad():
        got, expected = features(images), random_inception(pixels)[0]
    assert got.shape == (2, 2048) and features.num_features == 2048 and expected.abs().max() > 0.5
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the same tensors from safetensors
    from safetensors.torch import save_file

    save_file(random_inception.state_dict(), str(tmp_path / "inception.safetensors"))
    again = InceptionFeatures(str(tmp_path / "inception.safetensors")).extractor.state_dict()
    assert all(torch.equal(again[k], v) for k, v in random_inception.state_dict().items())


def test_inception_weights_are_never_unpickled_and_never_fetched(tmp_path):
    hostile = tmp_path / "hostile.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": Tripwire()}, hostile)
    with pytest.raises(ValueError, match=r"refused \(never unpickled\): .*Tripwire"):
        InceptionFeatures(str(hostile))
    assert Tripwire.built == []
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}}, nested)
    with pytest.raises(ValueError, match="not a flat dict of tensors"):
        InceptionFeatures(str(nested))
    for missing in (str(tmp_path / "absent.pth"), "memory://nowhere/absent.pth"):
        with pytest.raises(FileNotFoundError, match=f"{missing}.*releases/download/v0.2.0.*nothing is downloaded"):
            InceptionFeatures(missing)
