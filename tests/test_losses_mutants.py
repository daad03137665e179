"""Invariants of `ipfacediff.losses` that no other test pinned down (mutation review of eq. 5 / eq. 6 and the CLIP wrapper:
each test fails on at least one code change that the notebook's checks and the rest of tests/ let through). What they pin:
eq. 5's inputs must match in shape and y0's embedding is a constant; eq. 6's y0 / y_ref embeddings are constants too; one
reference caption serves a batch of edit prompts in `text_direction`; `load_clip` takes the folder's own image mean/std;
the CLIP wrapper is frozen. Tiny tensors and the tiny random CLIP, offline, one core."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest
import torch
import torch.nn as nn

from ipfacediff.losses import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, directional_clip_loss, identity_loss, load_clip,
                               text_direction, tiny_clip)

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def clip():
    return tiny_clip(0)


def _f_arc():
    "A small differentiable stand-in for ArcFace (frozen, like the real one)."
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16))
    return net.requires_grad_(False)


# ================================================================ eq. 5

def test_identity_loss_refuses_images_of_another_shape():
    "Kills M25 (shape check dropped): a single y0 against a batch of two ŷ would broadcast silently into a wrong L1 and D_cos."
    y_hat, y0 = torch.rand(2, 3, 16, 16), torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match='differ in shape'):
        identity_loss(y_hat, y0, _f_arc())
    with pytest.raises(ValueError, match='differ in shape'):
        identity_loss(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 8), _f_arc())


def test_identity_loss_treats_the_ground_truth_embedding_as_a_constant():
    """Kills M21 (f_arc(y0) outside no_grad): eq. 5 trains ε1 towards f_arc(y0), so even a y0 that requires grad gets
    only the L1 term's gradient, −sign(ŷ − y0)/N, and none through D_cos; ŷ gets both."""
    g = torch.Generator().manual_seed(0)
    y0 = torch.rand(2, 3, 16, 16, generator=g).requires_grad_()
    y_hat = (y0.detach() + 0.1 * torch.randn(2, 3, 16, 16, generator=g)).requires_grad_()
    loss, parts = identity_loss(y_hat, y0, _f_arc(), return_parts=True)
    assert parts['dcos'] > 1e-5                                           # D_cos is not zero, so a gradient through it would show
    loss.backward()
    torch.testing.assert_close(y0.grad, -torch.sign(y_hat - y0).detach() / y0.numel(), atol=1e-9, rtol=0)
    assert (y_hat.grad + y0.grad).abs().max() > 1e-6                     # ŷ does get D_cos's gradient on top of L1's


# ================================================================ eq. 6

def test_directional_loss_treats_y0_and_y_ref_embeddings_as_constants(clip):
    """Kills M47 (f_I(y0), f_I(y_ref) outside no_grad): only y_gen is trained; the original and reference images are
    targets, so no gradient reaches them even when they require grad."""
    g = torch.Generator().manual_seed(1)
    y0, y_ref, y_gen = (torch.rand(1, 3, 32, 32, generator=g).requires_grad_() for _ in range(3))
    dT = torch.nn.functional.normalize(torch.randn(1, 32, generator=g), dim=-1)
    directional_clip_loss(y_gen, y0, clip=clip, y_ref=y_ref, delta_t=dT).backward()
    assert y_gen.grad is not None and y_gen.grad.abs().sum() > 0
    assert y0.grad is None and y_ref.grad is None


def test_text_direction_pairs_one_reference_caption_with_every_edit_prompt(clip):
    """Kills M35 (`_as_list` no longer repeats a single prompt): one reference caption for a batch of edit prompts is the
    same as that caption repeated; a count mismatch that cannot be broadcast is refused (M45)."""
    tar = ['a face with a beard', 'a face with glasses']
    want = text_direction(clip, tar, ['a face', 'a face'])
    torch.testing.assert_close(text_direction(clip, tar, 'a face'), want, atol=0, rtol=0)
    torch.testing.assert_close(text_direction(clip, tar, ['a face']), want, atol=0, rtol=0)
    torch.testing.assert_close(text_direction(clip, 'a face with a beard', ['a face', 'an old face'])[0], want[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match='2 target prompts but 3 reference prompts'):
        text_direction(clip, tar, ['a', 'b', 'c'])


# ================================================================ CLIP wrapper

def test_load_clip_normalises_with_the_folders_own_image_mean_and_std(clip, tmp_path):
    """Kills M32 (load_clip ignores preprocessor_config.json): a CLIP saved with its own image mean/std (e.g. 0.5/0.5
    models) is fed (x − mean)/std with those; a folder without one falls back to OpenAI's constants."""
    from transformers import CLIPImageProcessor
    clip.model.save_pretrained(tmp_path); clip.tokenizer.save_pretrained(tmp_path)
    plain = load_clip(str(tmp_path))
    assert (plain.mean, plain.std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    CLIPImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3, size={'shortest_edge': 32},
                       crop_size={'height': 32, 'width': 32}).save_pretrained(tmp_path)
    own = load_clip(str(tmp_path))
    assert (own.mean, own.std) == ((0.5,) * 3, (0.25,) * 3)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = clip.model.get_image_features(pixel_values=(x - 0.5) / 0.25)
        want = out if isinstance(out, torch.Tensor) else out.pooler_output
        torch.testing.assert_close(own.encode_image(x), want, atol=1e-5, rtol=0)


def test_clip_encoder_is_frozen_but_passes_gradients_to_the_image(clip):
    """Kills M46 (ClipEncoder leaves CLIP's weights trainable): eq. 6 fine-tunes ε2 only; CLIP's weights take no gradient
    (no memory for their grads, nothing for an optimiser built from `requires_grad` to pick up), the image does."""
    assert not any(p.requires_grad for p in clip.parameters())
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)).requires_grad_()
    clip.encode_image(x).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in clip.parameters())
