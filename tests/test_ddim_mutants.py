"""Invariants of `ipfacediff.ddim` that no other test pinned down (mutation review of the DDPM/DDIM preliminaries: each test
fails on at least one code change that the notebook's checks and the rest of tests/ let through). What they pin: the DDIM
grid, the sampler and the inversion are built on the ᾱ schedule they are *given* (its own length T, checked against
diffusers' schedulers on a 100-step toy schedule); the default grid is SD's 50-step one; a grid of 0 steps and an inversion
`stop_at` off the grid are refused with a ValueError; inversion and sampling build no autograd graph; progress bars appear
only when asked; `ddim-demo` accepts every image format it lists and reports the exact relative round-trip error of its
analytic ε* (derived here from diffusers' DDIMInverseScheduler / DDIMScheduler). Tiny tensors, offline, one core."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ipfacediff.ddim import DEMO_FORMATS, alphas_cumprod_sd, check_demo_args, ddim_demo, ddim_invert, ddim_sample, ddim_timesteps
from ipfacediff.models import SD21_SCHEDULER_CONFIG

torch.set_num_threads(1)


def eps_zt(z, t):
    "A noise predictor that depends on the latent and the timestep (so a wrong t, ᾱ or z shows)."
    return torch.tanh(z) * (0.5 + t / 200) + 0.05 * np.cos(t / 10)


def _toy_schedulers(steps):
    "diffusers' DDIM sampler and inverse scheduler on a T = 100 linear-β schedule, SD's leading spacing and offset."
    kw = dict(num_train_timesteps=100, trained_betas=np.linspace(1e-3, 0.05, 100), clip_sample=False, steps_offset=1,
              timestep_spacing='leading', prediction_type='epsilon')
    fwd, inv = DDIMScheduler(**kw, set_alpha_to_one=False), DDIMInverseScheduler(**kw, set_alpha_to_one=False)
    fwd.set_timesteps(steps); inv.set_timesteps(steps)
    return fwd, inv


# ================================================================ the grid and the schedule

def test_sampler_and_inversion_run_on_the_schedule_they_are_given():
    """Kills M33 / M46 (inversion / sampler grid laid on T = 1000 whatever ᾱ's length), and M30 (the ᾱ passed in ignored
    for SD's) too: with a T = 100 schedule, 5 steps visit t = 81, 61, 41, 21, 1 (⌊100/5⌋ = 20, offset 1, by hand) and every
    latent is diffusers' for that schedule."""
    fwd, inv = _toy_schedulers(5)
    A = fwd.alphas_cumprod                                             # float32, length 100
    assert len(A) == 100 and fwd.timesteps.tolist() == [81, 61, 41, 21, 1]
    g = torch.Generator().manual_seed(0)
    z0, z_T = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)

    asked = []
    traj = ddim_invert(z0, lambda z, t: asked.append(t) or eps_zt(z, t), 5, alphas_cumprod=A)
    assert asked == [1, 21, 41, 61, 81] and sorted(traj) == asked
    z = z0
    for t in inv.timesteps:
        z = inv.step(eps_zt(z, int(t)), t, z).prev_sample
        torch.testing.assert_close(traj[int(t)], z, atol=1e-5, rtol=0)

    asked = []
    got = ddim_sample(z_T, lambda z, t: asked.append(t) or eps_zt(z, t), 5, alphas_cumprod=A)
    assert asked == [81, 61, 41, 21, 1]
    z = z_T
    for t in fwd.timesteps: z = fwd.step(eps_zt(z, int(t)), t, z, eta=0.0).prev_sample
    torch.testing.assert_close(got, z, atol=1e-5, rtol=0)


def test_default_grid_is_sds_50_step_grid():
    "Kills M23 (default of 25 steps): `ddim_timesteps()` is the 50-step grid 981 … 1 of diffusers' SD 2.1 scheduler, as are the samplers' defaults."
    s = DDIMScheduler(**SD21_SCHEDULER_CONFIG); s.set_timesteps(50)
    assert ddim_timesteps() == s.timesteps.tolist() and ddim_timesteps()[0] == 981 and ddim_timesteps()[-1] == 1
    z = torch.zeros(1, 1, 1, 1)
    inv_calls, smp_calls = [], []
    ddim_invert(z, lambda z, t: inv_calls.append(t) or z)
    ddim_sample(z, lambda z, t: smp_calls.append(t) or z)
    assert inv_calls == s.timesteps.tolist()[::-1] and smp_calls == s.timesteps.tolist()


def test_a_grid_of_zero_steps_is_refused_with_a_value_error():
    "Kills M15 (lower bound 0): 0 steps is no DDIM grid — a ValueError that says the range, not a ZeroDivisionError from ⌊T/0⌋."
    with pytest.raises(ValueError, match='between 1 and 1000, got 0'):
        ddim_timesteps(0)
    with pytest.raises(ValueError, match='between 1 and 100, got 0'):
        ddim_timesteps(0, T=100)


# ================================================================ inversion / sampling

def test_inversion_refuses_a_stop_at_off_the_grid():
    """Kills M38 (stop_at check dropped): t = 500 is not on the 10-step grid (991, 891, …, 1), so no step can end there;
    without the check the whole inversion runs and the caller's traj[500] is a KeyError later."""
    z0 = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    calls = []
    with pytest.raises(ValueError, match='t=500 is not on the 10-step DDIM grid'):
        ddim_invert(z0, lambda z, t: calls.append(t) or eps_zt(z, t), 10, alphas_cumprod=alphas_cumprod_sd(), stop_at=500)
    assert calls == []                                                 # refused before any ε is asked


def test_inversion_and_sampling_build_no_autograd_graph():
    """Kills M42 / M43 (@torch.no_grad() dropped): DDIM latents are targets, not trained through; with a trainable ε and a
    z that requires grad, neither the inverted z_t nor the sample carries a graph (50 UNet graphs would not fit in memory)."""
    w = torch.tensor(0.3, requires_grad=True)
    eps = lambda z, t: w * z
    z0 = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2)).requires_grad_()
    traj = ddim_invert(z0, eps, 4, alphas_cumprod=alphas_cumprod_sd())
    assert all(not v.requires_grad and v.grad_fn is None for v in traj.values())
    out = ddim_sample(z0, eps, 4, alphas_cumprod=alphas_cumprod_sd())
    assert not out.requires_grad and out.grad_fn is None


def test_progress_bars_only_when_asked(capsys):
    "Kills M47 (progress flag inverted): progress=False prints nothing; progress=True shows a 'DDIM sampling' / 'DDIM inversion' bar."
    z, A = torch.zeros(1, 1, 1, 1), alphas_cumprod_sd()
    ddim_sample(z, lambda z, t: z, 3, alphas_cumprod=A); ddim_invert(z, lambda z, t: z, 3, alphas_cumprod=A)
    o = capsys.readouterr()
    assert o.err == '' and o.out == ''
    ddim_sample(z, lambda z, t: z, 3, alphas_cumprod=A, progress=True)
    ddim_invert(z, lambda z, t: z, 3, alphas_cumprod=A, progress=True)
    err = capsys.readouterr().err
    assert 'DDIM sampling' in err and 'DDIM inversion' in err


# ================================================================ ddim-demo

def test_demo_accepts_every_image_format_it_lists(tmp_path):
    "Kills M52b (.jpeg refused by the suffix check): .jpeg is the same JPEG matplotlib writes as .jpg; every listed suffix, any case, passes the checks."
    assert set(DEMO_FORMATS) == {'png', 'pdf', 'svg', 'jpg', 'jpeg'}
    for ext in ('png', 'pdf', 'svg', 'jpg', 'jpeg', 'JPEG', 'Png'):
        assert check_demo_args(tmp_path / f'demo.{ext}', 3) == (tmp_path / f'demo.{ext}', 3)


def test_demo_reports_the_exact_round_trip_error_of_the_analytic_eps(tmp_path):
    """Kills M55 (the error not divided by mean |x0|) and M53 (ε* without its square root): for N(0, I) data the optimal ε*(x, t) = √(1−ᾱ_t) x is linear in x, so every
    DDIM step multiplies the latent by a scalar and the relative round-trip error is |c − 1|, c the product of the factors —
    whatever the data. c is measured here with diffusers' DDIMInverseScheduler then DDIMScheduler (SD 2.1, 5 steps)."""
    inv = DDIMInverseScheduler(**SD21_SCHEDULER_CONFIG)                  # starts from ᾱ_0 (set_alpha_to_one=False)
    fwd = DDIMScheduler(**SD21_SCHEDULER_CONFIG)
    inv.set_timesteps(5); fwd.set_timesteps(5)
    A = fwd.alphas_cumprod.double()
    eps = lambda z, t: (1 - A[t]).sqrt() * z
    z = torch.ones(1, dtype=torch.float64)
    for t in inv.timesteps: z = inv.step(eps(z, int(t)), t, z).prev_sample
    for t in fwd.timesteps: z = fwd.step(eps(z, int(t)), t, z, eta=0.0).prev_sample
    want = abs(z.item() - 1)
    assert 1e-4 < want < 1e-1                                          # 5 steps: a visible, small error
    out = tmp_path / 'demo.jpeg'
    err = ddim_demo(out, steps=5)
    assert err == pytest.approx(want, rel=1e-3)
    assert out.read_bytes()[:2] == b'\xff\xd8'                        # a JPEG was written
