"Core invariants of ddim / losses / injection / propagation that no other test pinned down (each found by a mutation that survived the suite)."
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ipfacediff.ddim import ddim_timesteps
from ipfacediff.injection import AttentionControl, injection_schedule
from ipfacediff.losses import ClipEncoder, clip_preprocess, directional_clip_loss, text_embedding, tiny_clip
from ipfacediff.models import SD21_SCHEDULER_CONFIG, encode_prompt, tiny_components
from ipfacediff.propagation import sample_keyframes


@pytest.fixture(scope='module')
def clip():
    torch.set_num_threads(1)
    return tiny_clip(0)


def _image_features(model, pixel_values):
    out = model.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------- ddim
def test_ddim_grid_is_leading_spacing_for_step_counts_that_do_not_divide_T():
    "t_i = i·⌊T/S⌋ + 1 (SD's 'leading' spacing) also when S does not divide 1000: the sampler must visit the ᾱ the model was run with."
    from diffusers import DDIMScheduler
    assert ddim_timesteps(6) == [831, 665, 499, 333, 167, 1]           # ⌊1000/6⌋ = 166, by hand
    assert ddim_timesteps(7) == [853, 711, 569, 427, 285, 143, 1]      # ⌊1000/7⌋ = 142
    for n in (3, 6, 7, 30, 60, 300):
        s = DDIMScheduler(**SD21_SCHEDULER_CONFIG); s.set_timesteps(n)
        assert ddim_timesteps(n) == s.timesteps.tolist(), n


# ---------------------------------------------------------------- losses
def test_directional_loss_measures_the_image_change_from_y_ref(clip):
    "Eq. 6's ΔI is f_I(y_gen) − f_I(y_ref) and its first term is against y0: a y_ref other than y0 must be the one used for ΔI."
    g = torch.Generator().manual_seed(0)
    y0, y_ref, y_gen = (torch.rand(2, 3, 32, 32, generator=g) for _ in range(3))
    dT = F.normalize(torch.randn(2, 32, generator=g), dim=-1)
    with torch.no_grad():
        e0, e_ref, e_gen = (F.normalize(clip.encode_image(y), dim=-1) for y in (y0, y_ref, y_gen))
    d_ref = e_gen - e_ref
    assert (d_ref.norm(dim=-1) > 1e-2).all() and ((e_gen - e0) - d_ref).norm(dim=-1).min() > 1e-2   # no floor; y_ref ≠ y0 matters
    want_dir = (1 - F.cosine_similarity(d_ref, dT, dim=-1)).mean()
    want_img = ((e_gen - e0) ** 2).sum(-1).mean()
    loss, parts = directional_clip_loss(y_gen, y0, clip=clip, y_ref=y_ref, delta_t=dT, lambda1=0.3, lambda2=0.7, return_parts=True)
    torch.testing.assert_close(parts['l_dir'], want_dir, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts['l_img'], want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, 0.3 * want_img + 0.7 * want_dir, atol=1e-5, rtol=0)


def test_template_text_embedding_is_each_prompts_renormalised_mean(clip):
    "With templates, f_T(p) = norm(mean_t norm(f_T(t(p)))) per prompt (StyleGAN-NADA): unit length, and prompts must not mix templates."
    templates = ('a photo of {}.', 'a portrait of {}.', 'a close-up photo of {}.')
    prompts = ['a face', 'a face with a beard']
    with torch.no_grad():
        got = text_embedding(clip, prompts, templates)
        want = torch.stack([F.normalize(F.normalize(clip.encode_text([t.format(p) for t in templates]), dim=-1).mean(0), dim=0)
                            for p in prompts])
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_clip_preprocess_downscale_is_antialiased_like_pil_bicubic():
    "CLIP was trained on PIL-bicubic (antialiased) resizes: a downscale must average, not point-sample (which aliases fine detail)."
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 64, 64, generator=g)
    got = clip_preprocess(img, size=16, mean=(0, 0, 0), std=(1, 1, 1))
    pil = torch.stack([torch.from_numpy(np.array(Image.fromarray(img[0, c].numpy()).resize((16, 16), Image.BICUBIC)))
                       for c in range(3)])[None]
    torch.testing.assert_close(got, pil, atol=1e-4, rtol=0)
    dots = torch.zeros(1, 3, 64, 64); dots[..., ::4, ::4] = 1                # mean 1/16: an average keeps it
    assert abs(clip_preprocess(dots, 16, mean=(0, 0, 0), std=(1, 1, 1)).mean().item() - 1 / 16) < 0.005


def test_clip_encoder_normalises_with_its_own_mean_and_std(clip):
    "A CLIP whose preprocessor has its own mean/std (e.g. 0.5/0.5 models) must be fed (x − mean)/std with those, not OpenAI's constants."
    enc = ClipEncoder(clip.model, clip.tokenizer, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))       # model size: no resize, no crop
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_image(x), _image_features(clip.model, (x - 0.5) / 0.25).float(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- injection
def test_injection_window_is_the_floor_of_the_fraction_of_steps():
    "PnP injects in the first int(S·τ) steps: with 7 steps τ_attn=0.5 → 3, τ_conv=0.8 → 5; with 3 steps 1 and 2 (never rounded up)."
    for n, na, nc in ((7, 3, 5), (3, 1, 2), (50, 25, 40)):
        ts = ddim_timesteps(n)
        s = injection_schedule(ts)
        assert [s[t] for t in ts] == [(i < na, i < nc) for i in range(n)], n


def test_default_injection_layers_are_pnp_decoder_layers_4_to_11():
    "Q,K are injected in exactly PnP's decoder self-attention layers 4–11 (up_blocks.1.attentions.1–2, up_blocks.2–3 all), not layer 3."
    torch.set_num_threads(1)
    c = tiny_components(0)
    want = [f'up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1' for b, a in
            ((1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2))]
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with AttentionControl(c.unet) as ctl:
        assert ctl.attn_names == want
        _, f = ctl.record(z, 501, encode_prompt(c, ''))
    assert sorted(f.q) == sorted(want) and sorted(f.k) == sorted(want)


# ---------------------------------------------------------------- propagation
def test_every_frame_of_a_batch_can_be_drawn_as_its_keyframe():
    "TokenFlow draws each batch's keyframe uniformly from all its frames (also the last, also a 1-frame batch): else some frames are never edited directly."
    g = torch.Generator().manual_seed(0)
    for n, bs in ((10, 4), (9, 4)):
        batches = [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]     # by hand
        seen = [set() for _ in batches]
        for _ in range(200):
            kf = sample_keyframes(n, bs, g).tolist()
            assert len(kf) == len(batches) and all(k in b for k, b in zip(kf, batches)), kf
            for s, k in zip(seen, kf): s.add(k)
        assert [sorted(s) for s in seen] == batches, (n, bs)
