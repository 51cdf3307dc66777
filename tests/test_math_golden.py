"""The diffusion math and the metrics against values computed here by hand, in float64, from the betas alone:
each test pins one formula tightly enough that a plausible slip in it (a flipped sign, a missing square root,
a swapped argument, a step off by one) fails it. tests/mutants.py plants those slips."""

import math

import numpy as np
import pytest
import torch

from dalle2.diffusion import GaussianDiffusion
from dalle2.metrics import clip_score, cmmd, r_precision
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
