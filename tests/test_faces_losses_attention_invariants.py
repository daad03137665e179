"""Invariants of ddim / losses / injection / propagation / faces that no other test pinned down (mutation review round 5:
each test fails on at least one code change that the rest of tests/ let through). What they pin: the DDIM step, sampler and
inversion against diffusers' own schedulers and by hand; eq. 5 and eq. 6 by hand (the ΔI floor, ΔT's direction and length,
CLIP's centre crop); the face track's gap rule (`covered`), FFHQ's quad, and which frames `paste_back` edits. Answers known by
construction; tiny random models, offline, one core."""
import math, warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipfacediff.ddim import (alphas_cumprod, alphas_cumprod_sd, ddim_invert, ddim_sample, ddim_step, ddim_timesteps, predict_x0,
                             q_sample, q_step, scaled_linear_betas)
from ipfacediff.faces import (FaceTrack, crop_matrix, ffhq_quad, load_track, paste_back, quad_corners, save_track, _follow)
from ipfacediff.losses import clip_preprocess, directional_clip_loss, identity_loss, text_direction, text_embedding, tiny_clip
from ipfacediff.models import SD21_SCHEDULER_CONFIG

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def clip():
    return tiny_clip(0)


# ================================================================ ddim

def eps_zt(z, t):
    "A noise predictor that depends on the latent and the timestep (so a wrong t or a wrong z shows)."
    return torch.tanh(z) * (0.5 + t / 2000) + 0.02 * math.cos(t / 100)


def test_ddim_step_and_x0_prediction_by_hand():
    "ᾱ_t = 0.64 → ᾱ_t' = 0.36: x̂0 = (x − 0.6 ε)/0.8, x' = 0.6 x̂0 + 0.8 ε, by hand."
    x, e = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(predict_x0(x, e, torch.tensor(0.64, dtype=torch.float64)), torch.tensor([0.875, -3.25], dtype=torch.float64))
    torch.testing.assert_close(ddim_step(x, e, torch.tensor(0.64, dtype=torch.float64), torch.tensor(0.36, dtype=torch.float64)),
                               torch.tensor([0.925, -1.15], dtype=torch.float64))


def test_sd_noise_schedule_is_diffusers_scaled_linear():
    "ᾱ_t of SD 2.1 (√β linear in t, then squared) is the one diffusers' scheduler uses for the same config."
    from diffusers import DDIMScheduler
    torch.testing.assert_close(alphas_cumprod_sd(), DDIMScheduler(**SD21_SCHEDULER_CONFIG).alphas_cumprod, atol=1e-6, rtol=0)
    b = scaled_linear_betas(3, 0.01, 0.04)                             # √β: 0.1, 0.15, 0.2
    torch.testing.assert_close(b, torch.tensor([0.01, 0.0225, 0.04], dtype=torch.float64))


def test_forward_process_closed_form_by_hand():
    "q(y_t|y_0): √ᾱ y0 + √(1−ᾱ) ε, and one step of eq. 1 from y0 is the closed form at t = 0."
    ab = torch.tensor([0.64, 0.36], dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    assert q_sample(one, 0, one, ab).item() == pytest.approx(0.8 + 0.6)
    assert q_sample(2 * one, 1, -one, ab).item() == pytest.approx(2 * 0.6 - 0.8)
    betas = torch.tensor([0.36, 0.5], dtype=torch.float64)             # ᾱ_0 = 0.64
    assert q_step(one, 0, one, betas).item() == pytest.approx(q_sample(one, 0, one, alphas_cumprod(betas)).item())


@pytest.mark.parametrize('n', [5, 7])
def test_ddim_sample_is_diffusers_ddim_scheduler(n):
    "ddim_sample visits the same ᾱ as diffusers' DDIMScheduler (eta = 0, SD 2.1's config), ending at ᾱ_0 (set_alpha_to_one=False)."
    from diffusers import DDIMScheduler
    s = DDIMScheduler(**SD21_SCHEDULER_CONFIG); s.set_timesteps(n)
    z_T = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(n))
    z = z_T
    for t in s.timesteps: z = s.step(eps_zt(z, int(t)), t, z, eta=0.0).prev_sample
    torch.testing.assert_close(ddim_sample(z_T, eps_zt, n, alphas_cumprod=s.alphas_cumprod), z, atol=1e-5, rtol=0)


@pytest.mark.parametrize('n', [5, 7])
def test_ddim_invert_is_diffusers_ddim_inverse_scheduler(n):
    "Every z_t of ddim_invert is diffusers' DDIMInverseScheduler's: start at ᾱ_0, ε asked at the timestep of the level reached."
    from diffusers import DDIMInverseScheduler
    s = DDIMInverseScheduler(**SD21_SCHEDULER_CONFIG); s.set_timesteps(n)
    z0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(10 + n))
    traj = ddim_invert(z0, eps_zt, n, alphas_cumprod=s.alphas_cumprod)
    assert sorted(traj) == sorted(int(t) for t in s.timesteps)
    z = z0
    for t in s.timesteps:
        z = s.step(eps_zt(z, int(t)), t, z).prev_sample
        torch.testing.assert_close(traj[int(t)], z, atol=1e-5, rtol=0)


def test_inversion_then_sampling_returns_to_the_start():
    "With ε a function of t alone each sampling step undoes its inversion step exactly: z0 comes back (float64, to 1e-10)."
    A = alphas_cumprod(scaled_linear_betas())
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1000, 4, 2, 2, generator=g, dtype=torch.float64)
    eps_t = lambda z, t: table[t]
    z0 = torch.randn(4, 2, 2, generator=g, dtype=torch.float64)
    for n in (1, 4, 10):
        traj = ddim_invert(z0, eps_t, n, alphas_cumprod=A)
        assert n == 1 or (traj[max(traj)] - z0).abs().max() > 0.1
        torch.testing.assert_close(ddim_sample(traj[max(traj)], eps_t, n, alphas_cumprod=A), z0, atol=1e-10, rtol=0)


def test_inversion_keeps_what_it_is_asked_and_stops_at_stop_at():
    "keep= holds exactly those z_t (the same tensors as a full run's); stop_at= runs no step beyond t and returns t's z_t."
    A = alphas_cumprod_sd()
    z0 = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    full = ddim_invert(z0, eps_zt, 10, alphas_cumprod=A)
    ts = ddim_timesteps(10)[::-1]                                     # ascending
    kept = ddim_invert(z0, eps_zt, 10, alphas_cumprod=A, keep={ts[2], ts[7]})
    assert sorted(kept) == [ts[2], ts[7]] and all(torch.equal(kept[t], full[t]) for t in kept)
    calls = []
    part = ddim_invert(z0, lambda z, t: calls.append(t) or eps_zt(z, t), 10, alphas_cumprod=A, stop_at=ts[3])
    assert calls == ts[:4] and sorted(part) == ts[:4] and torch.equal(part[ts[3]], full[ts[3]])


def test_ddim_grid_never_reaches_t_T():
    "1000 steps with SD's offset would need t = 1000 (ᾱ has 1000 entries): refused; 999 steps end at t = 999."
    with pytest.raises(ValueError, match='at most 999 steps'): ddim_timesteps(1000)
    assert ddim_timesteps(999)[0] == 999


# ================================================================ losses: eq. 5

def test_identity_loss_by_hand():
    "Eq. 5 with f_arc = the mean colour: ‖ŷ − y0‖₁ (mean over pixels) + D_cos, batch mean; ŷ = (1, ½, 0), y0 = red, by hand."
    col = lambda *rgb: torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    y0 = torch.cat([col(1, 0, 0), col(0, 0, 1)])
    y_hat = torch.cat([col(1, .5, 0), col(0, 0, 1)]).clone().requires_grad_(True)
    mean_rgb = lambda y: y.mean((2, 3))
    loss, parts = identity_loss(y_hat, y0, mean_rgb, return_parts=True)
    l1 = (0.5 / 3 + 0) / 2                                             # one channel off by ½ in image 0; image 1 exact
    dcos = ((1 - 1 / math.sqrt(1.25)) + 0) / 2
    assert parts['l1'].item() == pytest.approx(l1, abs=1e-12) and parts['dcos'].item() == pytest.approx(dcos, abs=1e-12)
    assert loss.item() == pytest.approx(l1 + dcos, abs=1e-12)
    loss.backward()
    assert y_hat.grad[0].abs().sum() > 0                               # the identity term trains ŷ


# ================================================================ losses: eq. 6

def test_direction_loss_floors_a_tiny_image_change(clip):
    "|ΔI| < min_delta: ΔI is divided by min_delta, not by |ΔI|, so a tiny change along ΔT costs 1 − |ΔI|/min_delta, not 0."
    g = torch.Generator().manual_seed(5)
    y0 = torch.rand(1, 3, 32, 32, generator=g)
    y_gen = (y0 + 1e-4 * torch.randn(1, 3, 32, 32, generator=g)).clamp(0, 1)
    with torch.no_grad():
        d = F.normalize(clip.encode_image(y_gen), dim=-1) - F.normalize(clip.encode_image(y0), dim=-1)
    n = d.norm().item()
    assert 0 < n < 1e-3
    loss, parts = directional_clip_loss(y_gen, y0, clip=clip, delta_t=d / n, lambda1=0.0, lambda2=1.0, return_parts=True)
    assert parts['l_dir'].item() == pytest.approx(1 - n / 1e-2, abs=1e-4)       # ≈ 0.99; unfloored it would be 0
    big = directional_clip_loss(y_gen, y0, clip=clip, delta_t=d / n, lambda1=0.0, lambda2=1.0, min_delta=n / 2)
    assert big.item() == pytest.approx(0.0, abs=1e-4)                            # above the floor: 1 − cos = 0


def test_text_direction_points_from_reference_to_target_and_is_unit(clip):
    "ΔT = norm(f_T(p_tar) − f_T(p_ref)), by hand from `text_embedding`: target minus reference, unit length."
    tar, ref = ['a face with a beard', 'an old face'], ['a face', 'a face']
    with torch.no_grad():
        dt = text_direction(clip, tar, ref)
        want = F.normalize(text_embedding(clip, tar) - text_embedding(clip, ref), dim=-1)
    torch.testing.assert_close(dt, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(dt.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(6)
    y0, y_gen = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    by_prompt = directional_clip_loss(y_gen, y0, tar, ref, clip=clip)
    torch.testing.assert_close(by_prompt, directional_clip_loss(y_gen, y0, clip=clip, delta_t=want), atol=1e-6, rtol=0)


def test_clip_preprocess_crops_the_centre_of_a_wide_image():
    "A 32×64 image for a 32² CLIP: no resize, the centre columns 16:48 are kept (where the face is), normalised."
    img = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(7))
    got = clip_preprocess(img, size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.testing.assert_close(got, (img[..., 16:48] - 0.5) / 0.25)
    tall = img.transpose(-1, -2)
    torch.testing.assert_close(clip_preprocess(tall, 32, (0.5,) * 3, (0.25,) * 3), (tall[..., 16:48, :] - 0.5) / 0.25)


# ================================================================ faces

def crop_lm(S):
    "68 hand-placed landmarks of a frontal face in an S×S crop (jaw, brows, eyes and mouth corners)."
    lm = np.zeros((68, 2))
    a = np.linspace(np.pi, 0, 17)
    lm[0:17] = np.c_[256 - 150 * np.cos(a), 250 + 170 * np.sin(a)]
    lm[17:27] = np.c_[np.linspace(150, 362, 10), np.full(10, 200)]
    lm[36:42] = np.c_[np.linspace(180, 230, 6), np.full(6, 235)]
    lm[42:48] = np.c_[np.linspace(282, 332, 6), np.full(6, 235)]
    lm[48], lm[54] = (210, 360), (302, 360)
    return lm * S / 512


def make_track(centres, halves, detected, size=64, frame_size=(128, 128), max_gap=25):
    "A FaceTrack by hand: frame i's quad has centre `centres[i]` and half-side `halves[i]` (eye line horizontal)."
    c = np.asarray(centres, np.float64); x = np.c_[np.asarray(halves, np.float64), np.zeros(len(c))]
    M = np.stack([crop_matrix(ci, xi, size) for ci, xi in zip(c, x)])
    Minv = np.stack([np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2] for m in M])
    lms = np.stack([crop_lm(size) @ m[:, :2].T + m[:, 2] for m in Minv])
    n = len(c)
    return FaceTrack(size=size, frame_size=frame_size, landmarks=lms, boxes=np.zeros((n, 4)), detected=np.asarray(detected, bool),
                     n_faces=np.asarray(detected, int), raw_quads=quad_corners(c, x), quads=quad_corners(c, x),
                     crop_from_frame=M, frame_from_crop=Minv, max_gap=max_gap)


def test_covered_gap_length_is_at_most_max_gap():
    "A gap of exactly max_gap frames between two sightings is covered (every frame of it), one frame more is not."
    tr = make_track([(64, 64)] * 6, [30] * 6, [True, False, False, True, False, False])
    assert tr.covered(2).tolist() == [True, True, True, True, False, False]
    assert tr.covered(1).tolist() == [True, False, False, True, False, False]
    tr = make_track([(64, 64)] * 5, [30] * 5, [False, True, False, True, False])
    assert tr.covered_span() == (1, 4)                                 # from the first to past the last covered frame
    assert make_track([(64, 64)] * 3, [30] * 3, [False] * 3).covered_span() == (0, 0)


def test_covered_allows_half_a_side_per_frame_of_the_gap():
    "Over a gap the face may move (b − a) × half its side: 2.9 halves in 3 frames is covered, 3.1 halves is not."
    for move, want in ((2.9, True), (3.1, False)):
        tr = make_track([(40, 64), (40, 64), (40, 64), (40 + 20 * move, 64)], [20] * 4, [True, False, False, True])
        assert tr.covered(5).tolist() == [True, want, want, True], move


def test_covered_needs_the_same_size_on_both_sides():
    "A face 1.4× the size across the gap is the same face; 1.6× is someone else (the tracker's 1.5× rule)."
    for k, want in ((1.4, True), (1.6, False)):
        tr = make_track([(64, 64)] * 3, [20, 20, 20 * k], [True, False, True])
        assert tr.covered(5).tolist() == [True, want, True], k
        tr = make_track([(64, 64)] * 3, [20 * k, 20, 20], [True, False, True])
        assert tr.covered(5).tolist() == [True, want, True], k


def paste_track(max_gap):
    "A still face, found in frames 0 and 3 only; edited crops all white onto black frames."
    tr = make_track([(64, 64)] * 4, [40] * 4, [True, False, False, True], max_gap=max_gap)
    return np.zeros((4, 128, 128, 3), np.uint8), np.full((4, 64, 64, 3), 255, np.uint8), tr


def test_paste_back_gap_rule_defaults_to_the_tracks_own():
    "max_gap='track' uses the gap the track was made with (1 here: frames 1–2 left as they are); None pastes into every frame."
    frames, crops, tr = paste_track(max_gap=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        out = paste_back(frames, crops, tr, progress=False)
    assert [bool(o.any()) for o in out] == [True, False, False, True]
    assert any('frames 1–2' in str(m.message) for m in w)
    out = paste_back(frames, crops, tr, progress=False, max_gap=None)
    assert all(o.max() == 255 for o in out)
    _, _, tr2 = paste_track(max_gap=2)
    assert all(o.max() == 255 for o in paste_back(frames, crops, tr2, progress=False))


def test_track_file_keeps_its_max_gap(tmp_path):
    "A saved track is read back with the gap rule it was made with (paste_back's default), not MAX_GAP."
    tr = make_track([(64, 64)] * 4, [40] * 4, [True, False, False, True], max_gap=1)
    back = load_track(save_track(tr, tmp_path / 't.npz'))
    assert back.max_gap == 1 and type(back.max_gap) is int and back.covered().tolist() == [True, False, False, True]
    assert back.size == 64 and type(back.size) is int and back.frame_size == (128, 128)


def test_ffhq_quad_by_hand():
    """FFHQ's crop: eyes at (100, 100), (140, 100), mouth corners (110, 150), (130, 150) → c = eye_avg + 0.1 eye_to_mouth = (120, 105),
    x along the eye line of length max(2·40, 1.8·50) = 90; corners top-left, bottom-left, bottom-right, top-right (y down)."""
    lm = np.zeros((68, 2))
    lm[36:42], lm[42:48] = (100, 100), (140, 100)
    lm[48], lm[54] = (110, 150), (130, 150)
    c, x = ffhq_quad(lm)
    np.testing.assert_allclose(c, [120, 105]); np.testing.assert_allclose(x, [90, 0], atol=1e-12)
    lm[42:48] = (180, 100); lm[48], lm[54] = (130, 150), (150, 150)     # wide eyes: 2·eye distance = 160 wins
    np.testing.assert_allclose(ffhq_quad(lm)[1], [160, 0], atol=1e-12)
    np.testing.assert_allclose(quad_corners([10, 20], [2, 0]), [[8, 18], [8, 22], [12, 22], [12, 18]])


def test_face_that_comes_back_after_max_gap_plus_one_frames_undoes_the_jump():
    "The jump to a lone face elsewhere is held for max_gap + 1 frames: the followed face back at frame 3 (max_gap 1) undoes it."
    box = lambda x: np.array([[x, 0, x + 100., 100.]])
    none = np.zeros((0, 4))
    assert _follow([box(0), box(400), none, box(0)], 1) == ([0, None, None, 0], [])
    assert _follow([box(0), box(400), none, none, box(0)], 1)[0] == [0, 0, None, None, 0]   # one frame later: the jump stands


def test_crop_jitter_is_the_second_difference():
    "A crop moving and growing at a constant rate has no jitter (second differences 0); a 3 px kick of one centre gives |Δ²| = 3, 6, 3: mean 4, by hand."
    c = np.c_[np.arange(5) * 4.0, np.zeros(5)]; half = 20 + np.arange(5) * 2.0
    q = quad_corners(c, np.c_[half, np.zeros(5)])
    from ipfacediff.faces import crop_jitter
    assert crop_jitter(q) == {'center': 0.0, 'side': 0.0}
    c[2, 1] = 3.0                                                     # second differences of y: 3, −6, 3
    assert crop_jitter(quad_corners(c, np.c_[half, np.zeros(5)])) == pytest.approx({'center': 4.0, 'side': 0.0})


def test_head_mask_holds_the_face_mask_and_reaches_higher():
    "region='head' widens the face region (hair above and around): it contains the 'face' mask and covers more above the brows."
    from ipfacediff.faces import face_mask
    face, head = (face_mask(crop_lm(256), 256, region=r) for r in ('face', 'head'))
    assert (head >= face - 1e-3).all()
    top = lambda m: np.flatnonzero(m.max(1) > 0.5)[0]
    assert top(head) < top(face) - 20 and head.sum() > 1.3 * face.sum()


# ================================================================ injection / propagation

T = 501


@pytest.fixture(scope='module')
def nets():
    from shared import two_branches
    return two_branches(2, 'a face with glasses')


def test_batched_recording_keeps_only_the_source_rows(nets):
    "A recording forward with a BatchedSource keeps, for every feature (Q, K, tokens, resnet), the source rows only: ε1's recording."
    from ipfacediff.injection import BatchedSource, StepPlan
    from ipfacediff.propagation import TokenFlowControl
    with TokenFlowControl(nets['eps1']) as ctl:
        _, alone = ctl.record(nets['z_src'], T, nets['c_src'])
        ctl.forward(nets['z'], T, nets['c_cfg'], StepPlan(record=True), source=BatchedSource(nets['z_src'], nets['c_src']))
        got = ctl.features
    assert all(len(d) for d in got._maps())
    for a, b in zip(got._maps(), alone._maps()):
        assert sorted(a) == sorted(b)
        for n in a: torch.testing.assert_close(a[n], b[n], atol=1e-4, rtol=0)


def test_control_is_inactive_after_exit(nets):
    "Once the with-block is left, the control refuses to run (its processors are gone) instead of silently recording nothing."
    from ipfacediff.injection import AttentionControl
    ctl = AttentionControl(nets['eps1'])
    with ctl: ctl.record(nets['z_src'][:1], T, nets['c_src'])
    with pytest.raises(RuntimeError, match='not active'): ctl.record(nets['z_src'][:1], T, nets['c_src'])


def test_one_layer_name_as_a_string(nets):
    "attn_layers='up_blocks.1.attentions.1' (one string, not a list) means that transformer's attn1, not its characters."
    from ipfacediff.injection import resolve_attn_layers
    assert resolve_attn_layers(nets['eps1'], 'up_blocks.1.attentions.1') == ['up_blocks.1.attentions.1.transformer_blocks.0.attn1']


@pytest.mark.parametrize('kf', [[1, 0], [1, 1]])
def test_keyframes_must_be_sorted_and_distinct(nets, kf):
    "Keyframes out of order or repeated are refused before the forward (eq. 4's past/future keyframes need them sorted)."
    from ipfacediff.propagation import TokenFlowControl, propagation_weights
    with pytest.raises(ValueError, match='distinct and sorted'): propagation_weights(torch.arange(3), kf)
    with TokenFlowControl(nets['eps2']) as edit:
        with pytest.raises(ValueError, match='distinct and sorted'):
            edit.edit_keyframes(nets['z'], T, nets['c_cfg'], kf, source=None, attn=False, conv=False)
