"""The diffusion math: schedules, forward process, parameterisations, posterior, samplers, guidance."""

import pytest
import torch

from dalle2.diffusion import GaussianDiffusion, cosine_betas, guidance, linear_betas


@pytest.fixture(params=["cosine", "linear"])
def diffusion(request):
    return GaussianDiffusion(timesteps=100, beta_schedule=request.param, predict="eps")


@pytest.mark.parametrize("schedule", [cosine_betas, linear_betas])
def test_schedules_are_valid(schedule):
    betas = schedule(200)
    assert betas.shape == (200,)
    assert (betas > 0).all() and (betas < 1).all()
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    assert alphas_cumprod[-1] < 0.01  # the last step is (nearly) pure noise


def test_q_sample_moments(diffusion):
    torch.manual_seed(0)
    x0 = torch.full((40000, 2), 0.7)
    for t_value in (0, 10, 50, 99):
        t = torch.full((x0.shape[0],), t_value)
        xt = diffusion.q_sample(x0, t, torch.randn_like(x0))
        alpha = diffusion.alphas_cumprod[t_value]
        assert xt.mean().item() == pytest.approx((alpha.sqrt() * 0.7).item(), abs=0.01)
        assert xt.std().item() == pytest.approx((1 - alpha).sqrt().item(), rel=0.02, abs=2e-3)


def test_posterior_at_t0_returns_x0(diffusion):
    x0, xt = torch.randn(8, 5), torch.randn(8, 5)
    mean, variance, log_variance = diffusion.q_posterior(x0, xt, torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (variance == 0).all() and torch.isfinite(log_variance).all()


def test_parameterisations_invert(diffusion):
    torch.manual_seed(0)
    x0, eps = torch.randn(16, 6), torch.randn(16, 6)
    t = torch.randint(0, 100, (16,))
    xt = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(diffusion.x0_from_eps(xt, t, eps), x0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(diffusion.eps_from_x0(xt, t, x0), eps, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(diffusion.x0_from_v(xt, t, diffusion.v_from(x0, eps, t)), x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("predict", ["eps", "x0", "v"])
def test_target_and_output_agree(predict):
    d = GaussianDiffusion(timesteps=50, predict=predict)
    x0, noise = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0, 10, 30, 49])
    xt = d.q_sample(x0, t, noise)
    # A perfect network outputs the target; turning it back into x0 must give x0.
    torch.testing.assert_close(d.x0_from_output(d.target(x0, noise, t), xt, t), x0, atol=1e-3, rtol=1e-3)
    perfect = lambda x, tt: d.target(x0, noise, tt)  # noqa: E731
    assert d.loss(perfect, x0, t=t, noise=noise).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("predict", ["eps", "x0", "v"])
@pytest.mark.parametrize("steps", [50, 10])
def test_samplers_reach_the_data_with_an_oracle(predict, steps):
    """With a model that knows the single data point, DDPM (all steps) and DDIM (fewer) land on it."""
    d = GaussianDiffusion(timesteps=50, predict=predict)
    target = torch.randn(1, 6)

    def oracle(x, t):
        x0 = target.expand_as(x)
        eps = d.eps_from_x0(x, t, x0)
        return d.target(x0, eps, t)

    out = d.sample(oracle, (3, 6), sample_timesteps=steps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target.expand(3, 6), atol=1e-3, rtol=1e-3)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    d = GaussianDiffusion(timesteps=100, predict="eps")
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    model_fn = lambda x, t: layer(x) * (t[:, None] / 100)  # noqa: E731
    noise = torch.randn(5, 4)
    with torch.no_grad():
        a = d.sample(model_fn, noise.shape, noise=noise, sample_timesteps=20, eta=0.0)
        b = d.sample(model_fn, noise.shape, noise=noise, sample_timesteps=20, eta=0.0)
        c = d.sample(model_fn, noise.shape, noise=noise, sample_timesteps=20, eta=1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_time_pairs_cover_the_schedule():
    d = GaussianDiffusion(timesteps=100)
    pairs = d.time_pairs(64)
    assert len(pairs) == 64 and pairs[0][0] == 99 and pairs[-1][1] == -1
    assert all(t > t_prev for t, t_prev in pairs)
    assert d.time_pairs(100) == [(t, t - 1) for t in range(99, -1, -1)]
    with pytest.raises(ValueError, match="sample_timesteps"):
        d.time_pairs(101)


def test_guidance():
    cond, null = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(guidance(cond, null, 1.0), cond)
    torch.testing.assert_close(guidance(cond, null, 3.0), null + 3.0 * (cond - null))
    torch.testing.assert_close(guidance(cond, null, 0.0), null)


def test_p2_weighting_favours_noisy_steps():
    d = GaussianDiffusion(timesteps=100, p2_loss_weight_gamma=1.0)
    weights = d.p2_loss_weight
    assert (weights[1:] > weights[:-1]).all()  # higher noise (lower SNR) weighs more
    assert torch.equal(GaussianDiffusion(timesteps=100).p2_loss_weight, torch.ones(100))


def test_inpainting_keeps_known_values():
    d = GaussianDiffusion(timesteps=40, predict="eps")
    torch.manual_seed(0)
    known = torch.randn(2, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., :4] = True
    model_fn = lambda x, t: torch.zeros_like(x)  # noqa: E731
    out = d.sample(model_fn, known.shape, inpaint_image=known, inpaint_mask=mask, inpaint_resample_times=2,
                   sample_timesteps=10)
    torch.testing.assert_close(out[..., :4], known[..., :4])
    assert not torch.allclose(out[..., 4:], known[..., 4:])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="beta_schedule"):
        GaussianDiffusion(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="predict"):
        GaussianDiffusion(predict="score")
