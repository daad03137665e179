"""TokenFlow propagation (08_tokenflow) invariants from a mutation review of `ipfacediff/propagation.py`: each test fails
on at least one hand-made change to that module that the rest of tests/ let through (and, but for the no-source test,
the notebook's checks run against the package too). What they pin: the keyframe draw (uniform inside every batch, the
last short one too, and independent from batch to batch); the keyframe slice a batch reads (`local_weights`) when its
past keyframe is not the video's first; the control's propagation for frames that do not start at frame 0 (eq. 4 with
the frames' own indices, the keyframe slice applied to the outputs and the tokens alike, only that slice read);
`tokenflow_layers` leaving the other layers alone; the no-source field grouped by prompt chunk; the row check's message.
Tiny random tensors and tiny random UNets, offline, one core."""
import os
from unittest import mock

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest
import torch

from ipfacediff import propagation
from ipfacediff.propagation import (TokenFlowControl, extended_attention, local_weights, propagate_features,
                                    propagation_weights, sample_keyframes)

torch.set_num_threads(1)
T = 501
LAYER = 'up_blocks.3.attentions.2.transformer_blocks.0.attn1'   # a 16×16-token TokenFlow layer


@pytest.fixture(scope='module')
def nets():
    from shared import two_branches
    return two_branches(6, 'a face with sunglasses')


def attn1_outputs(unet, names, run):
    "Run `run()` with forward hooks on the attn1 modules `names` of `unet`; {name: (input tokens, output)} of the last call."
    mods, seen = dict(unet.named_modules()), {}
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o))) for n in names]
    try: result = run()
    finally:
        for h in hooks: h.remove()
    return result, seen


# ---------------------------------------------------------------- keyframe draws
def test_keyframe_draw_is_uniform_in_every_batch_and_independent_across_batches():
    """Each batch's keyframe is uniform over that batch's frames — also the last, shorter batch — and drawn independently
    of the other batches. Kills: the offset drawn over `batch_size` and wrapped (`randint(batch_size) % len(b)`: the short
    last batch favours its first frames); one offset shared by all batches (clamped into the short one)."""
    g, n, bs, N = torch.Generator().manual_seed(0), 13, 8, 4000      # batches 0–7 and 8–12
    draws = torch.stack([sample_keyframes(n, bs, g) for _ in range(N)])
    assert ((draws[:, 0] >= 0) & (draws[:, 0] < 8) & (draws[:, 1] >= 8) & (draws[:, 1] < 13)).all()
    for col, frames in ((0, range(0, 8)), (1, range(8, 13))):
        counts = torch.bincount(draws[:, col], minlength=n)[list(frames)].float()
        expect = N / len(frames)                                       # 500 and 800; binomial sd ≈ 21 and 25
        assert ((counts - expect).abs() < 0.2 * expect).all(), (col, counts.tolist())
    same = (draws[:, 0] == draws[:, 1] - 8).float().mean().item()    # same offset in both: 5 · 1/8 · 1/5 = 1/8 if independent
    assert abs(same - 1 / 8) < 0.04, same


# ---------------------------------------------------------------- extended attention
def test_extended_attention_one_query_per_chunk():
    """`chunk_size=1` (one query per kernel call) is the unchunked result. Kills: queries cut in pieces of `chunk_size − 1`
    (the same result for every other size, a zero-step range here)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(extended_attention(q, k, v, chunk_size=1), extended_attention(q, k, v), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the keyframe slice
def test_local_weights_slice_starts_at_the_first_frames_past_keyframe():
    """Frames 9–12 between keyframes 2, 6, 10, 14 read keyframes 6, 10, 14 only: the slice starts at position 1 and j⁻, j⁺
    count from there; frames after the last keyframe read it alone. By hand. Kills: the slice always starting at 0 (then
    every batch normalises all earlier keyframes: quadratic in the video's length); the slice's end one short."""
    kf = torch.tensor([2, 6, 10, 14])
    span, (jm, jp, wm) = local_weights(torch.arange(9, 13), kf)
    assert (span.start, span.stop) == (1, 4)
    assert jm.tolist() == [0, 1, 1, 1] and jp.tolist() == [1, 1, 2, 2]
    assert wm.tolist() == [0.25, 1.0, 0.75, 0.5]
    span, (jm, jp, wm) = local_weights(torch.tensor([15, 16]), kf)
    assert (span.start, span.stop) == (3, 4) and jm.tolist() == jp.tolist() == [0, 0] and wm.tolist() == [1.0, 1.0]
    # eq. 4 on that slice is eq. 4 on the whole list (positions counted from the start of kf_out's K axis)
    g = torch.Generator().manual_seed(0)
    ko, ky, x = torch.randn(2, 4, 10, 3, generator=g), torch.randn(4, 10, 6, generator=g), torch.randn(4, 10, 6, generator=g)
    frames = torch.arange(9, 13)
    assert torch.equal(propagate_features(ko, ky, x, frames, kf), propagate_features(ko, ky, x, frames, kf, weights=propagation_weights(frames, kf)))


# ---------------------------------------------------------------- the control away from frame 0
def test_control_propagates_a_batch_whose_past_keyframe_is_not_the_first(nets):
    """Keyframes 1, 3, 5 and the batch of frames 3, 4 (as the pipeline's second batch sees them): every propagated attn1
    output is eq. 4 of the frames' own indices (frame 3 is a keyframe and takes its output exactly; frame 4 is ½ keyframe 3
    + ½ keyframe 5), and the control hands `propagate_features` only keyframes 3 and 5. Kills: the keyframe slice not
    applied to the outputs, or to neither outputs nor tokens (the slice's positions then point at keyframe 1); eq. 4 from
    the frames' positions in the batch (0, 1) instead of their indices in the video; the weights made over all keyframes
    (same result, but every batch reads every keyframe)."""
    eps1, eps2, zs, z = nets['eps1'], nets['eps2'], nets['z_src'], nets['z']
    kf, b = torch.tensor([1, 3, 5]), torch.tensor([3, 4])
    widths, real = [], propagate_features
    spy = lambda kf_out, *a, **kw: widths.append(kf_out.shape[1]) or real(kf_out, *a, **kw)
    with TokenFlowControl(eps1) as src, TokenFlowControl(eps2) as edit:
        _, f_kf = src.record(zs[kf], T, nets['c_src'])
        _, keys = edit.edit_keyframes(z[kf], T, nets['c_cfg'], kf, source=f_kf)
        _, f_b = src.record(zs[b], T, nets['c_src'])
        with mock.patch.object(propagation, 'propagate_features', spy):
            _, seen = attn1_outputs(eps2, edit.token_names, lambda: edit.propagate(z[b], T, nets['c_cfg'], b, source=f_b, keyframes=keys))
    assert len(seen) == 16
    for n, (_, o) in seen.items():
        o = o.view(2, 2, *o.shape[1:])                                     # (prompt chunk, frame, L, C)
        want = propagate_features(keys.out[n], keys.tokens[n], f_b.tokens[n], b, kf)
        torch.testing.assert_close(o, want, atol=1e-6, rtol=0)
        assert torch.equal(o[:, 0], keys.out[n][:, 1]), n                # frame 3 is keyframe 3: its own output, bit for bit
        assert (o[:, 1] - keys.out[n][:, 0]).abs().max() > 1e-3, n        # and frame 4 does not come from keyframe 1
    assert widths == [2] * 16                                             # each layer read keyframes 3 and 5 alone


# ---------------------------------------------------------------- tokenflow_layers
def test_tokenflow_layers_leave_the_other_layers_plain(nets):
    """With `tokenflow_layers=[LAYER]` only LAYER is extended / propagated: the keyframe store holds LAYER alone and every
    other attn1 layer's output in the keyframe pass is the network's own (per frame, no extended attention). Kills:
    `attend` ignoring `token_names` (every self-attention layer made TokenFlow)."""
    eps2, z, c = nets['eps2'], nets['z'], nets['c_cfg']
    kf = torch.tensor([0, 2])
    others = [n for n in TokenFlowControl(eps2).token_names if n != LAYER]
    with TokenFlowControl(eps2, tokenflow_layers=[LAYER]) as edit:
        (_, keys), seen = attn1_outputs(eps2, others, lambda: edit.edit_keyframes(z[kf], T, c, kf, source=None, attn=False, conv=False))
    assert set(keys.out) == set(keys.tokens) == {LAYER}
    _, plain = attn1_outputs(eps2, others, lambda: eps2(z[kf].repeat(2, 1, 1, 1), T, encoder_hidden_states=c.repeat_interleave(2, 0)))
    assert len(seen) == 15
    for n in others: torch.testing.assert_close(seen[n][1], plain[n][1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- no source: ε2's own tokens
def test_no_source_field_is_each_prompt_chunks_own_tokens(nets):
    """Without a source the NN field comes from ε2's own attn1 inputs, one field per prompt chunk: the keyframe store's
    tokens are the layer's input rows grouped (chunk, keyframe), and a moving video's propagated outputs are eq. 4 through
    those per-chunk fields. Kills: the rows grouped (keyframe, chunk) — which pytest's static-video test cannot see (the
notebook's static check happens to catch it; this one does in pytest, with a moving video)."""
    eps2, z, c = nets['eps2'], nets['z'], nets['c_cfg']
    kf, b = torch.tensor([1, 4]), torch.arange(6)
    with TokenFlowControl(eps2) as edit:
        (_, keys), seen_kf = attn1_outputs(eps2, [LAYER], lambda: edit.edit_keyframes(z[kf], T, c, kf, source=None, attn=False, conv=False))
        _, seen = attn1_outputs(eps2, [LAYER], lambda: edit.propagate(z, T, c, b, source=None, keyframes=keys, attn=False, conv=False))
    x_kf, x = seen_kf[LAYER][0], seen[LAYER][0]                          # (2·K, L, C) and (2·n, L, C), rows chunk-major
    assert torch.equal(keys.tokens[LAYER], x_kf.view(2, 2, *x_kf.shape[1:]))
    want = propagate_features(keys.out[LAYER], keys.tokens[LAYER], x.view(2, 6, *x.shape[1:]), b, kf)
    torch.testing.assert_close(seen[LAYER][1].view(2, 6, *x.shape[1:]), want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- misuse
def test_propagation_with_other_prompts_than_the_keyframes_is_named(nets):
    """Keyframes edited with two prompt chunks, frames propagated with one: a ValueError that says the rows do not match,
    not a shape error deep in the UNet. Kills: the row check dropped."""
    eps1, eps2, zs, z, c = nets['eps1'], nets['eps2'], nets['z_src'], nets['z'], nets['c_cfg']
    with TokenFlowControl(eps1) as src, TokenFlowControl(eps2) as edit:
        _, f = src.record(zs[:2], T, nets['c_src'])
        _, keys = edit.edit_keyframes(z[[1]], T, c, [1], source=f.select([1]), attn=False, conv=False)
        with pytest.raises(ValueError, match='2 edit rows but 4 propagated rows'):
            edit.propagate(z[:2], T, c[1:], [0, 1], source=f, keyframes=keys, attn=False, conv=False)
