"Review checks of 07_injection / 08_tokenflow: source rows are the frames, Q,K injection in keyframe mode by hand, inputs in the UNet's dtype."
import copy
import os
from unittest import mock

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest
import torch

from ipfacediff.ddim import ddim_timesteps
from ipfacediff.injection import AttentionControl, BatchedSource
from ipfacediff.models import encode_prompt, tiny_components
from ipfacediff.propagation import TokenFlowControl
from ipfacediff.utils import UserError

T = 501
LAYER = 'up_blocks.3.attentions.2.transformer_blocks.0.attn1'   # an injection layer and a TokenFlow layer


@pytest.fixture(scope='module')
def nets():
    torch.set_num_threads(1)
    return two_branches(4, 'a face with sunglasses')


from shared import one_line_error, two_branches


# ---------------------------------------------------------------- 1. source rows = frames
def test_injection_refuses_features_of_other_frames(nets):
    "4 recorded frames for 2 frames × 2 guidance chunks divide the 4 edit rows, but are not the frames: refused (was silent)."
    z2 = nets['z'][:2]
    with AttentionControl(nets['eps1']) as src, AttentionControl(nets['eps2']) as edit:
        _, f4 = src.record(nets['z_src'], T, nets['c_src'])
        for a, c in ((True, True), (True, False), (False, True)):
            one_line_error(lambda: edit.inject(z2, T, nets['c_cfg'], source=f4, attn=a, conv=c), 'source features have 4 rows for 2 frames')
        one_line_error(lambda: edit.inject(z2, T, nets['c_cfg'], source=f4.select([0])), 'source features have 1 rows for 2 frames')
        assert edit.inject(z2, T, nets['c_cfg'], source=f4.select([0, 1])).shape == (4, 4, 16, 16)
    with AttentionControl(nets['eps1']) as ctl:
        for a, c in ((True, True), (False, True)):
            one_line_error(lambda: ctl.inject(z2, T, nets['c_cfg'], source=BatchedSource(nets['z_src'], nets['c_src']), attn=a, conv=c),
                                'source features have 4 rows for 2 frames')


def test_tokenflow_refuses_tokens_of_other_frames(nets):
    "The NN-field tokens must be the keyframes' (keyframe pass) or the frames' (propagation), also with injection off."
    kf, ze = torch.tensor([0, 2]), nets['z']
    with TokenFlowControl(nets['eps1']) as src, TokenFlowControl(nets['eps2']) as edit:
        _, f4 = src.record(nets['z_src'], T, nets['c_src'])
        one_line_error(lambda: edit.edit_keyframes(ze[kf], T, nets['c_cfg'], kf, source=f4, attn=False, conv=False),
                            'source features have 4 rows for 2 frames')
        _, keys = edit.edit_keyframes(ze[kf], T, nets['c_cfg'], kf, source=f4.select(kf), attn=False, conv=False)
        one_line_error(lambda: edit.propagate(ze[:3], T, nets['c_cfg'], [0, 1, 2], source=f4, keyframes=keys, attn=False, conv=False),
                            'source features have 4 rows for 3 frames')
    with TokenFlowControl(nets['eps1']) as ctl:
        one_line_error(lambda: ctl.edit_keyframes(ze[kf], T, nets['c_cfg'], kf, source=BatchedSource(nets['z_src'], nets['c_src']),
                                                       attn=False, conv=False), 'source features have 4 rows for 2 frames')


# ---------------------------------------------------------------- 2. Q,K injection in keyframe mode
def test_keyframe_output_is_extended_attention_of_eps1_qk_and_eps2_v(nets):
    "ε2's attn1 output in keyframe mode = to_out(softmax(Q¹_i [K¹]ᵀ/√d) [V²_c]) over the concatenated keyframes, by hand."
    eps1, eps2, c_cfg = nets['eps1'], nets['eps2'], nets['c_cfg']
    a1, a2 = (dict(u.named_modules())[LAYER] for u in (eps1, eps2))
    kf = torch.tensor([0, 1, 3])
    zs, ze = nets['z_src'][kf], nets['z'][kf]

    def qkv(a, x): return [t.view(*x.shape[:2], a.heads, -1).transpose(1, 2) for t in (a.to_q(x), a.to_k(x), a.to_v(x))]

    def by_hand(q, k, v, extended=True):   # (K, h, L, d) → (K, L, C)
        K, h, L, d = k.shape
        if extended: k, v = (t.transpose(0, 1).reshape(h, K * L, d) for t in (k, v))
        o = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1) @ v
        return a2.to_out[1](a2.to_out[0](o.transpose(1, 2).flatten(2)))
    chunks = lambda f, q, k, v2: torch.cat([f(q, k, v) for v in v2.chunk(2)])   # ε1's Q,K for both prompt chunks
    seen = {}
    spy = lambda key: (lambda m, args, out: seen.__setitem__(key, (args[0], out)))
    with TokenFlowControl(eps1) as src, TokenFlowControl(eps2) as edit:
        hooks = [a1.register_forward_hook(spy('a1')), a2.register_forward_hook(spy('a2'))]
        try:
            _, f = src.record(zs, T, nets['c_src'])
            x1 = seen['a1'][0]
            eps = {}
            for a, c in ((True, False), (True, True), (False, False)):
                eps[a, c], keys = edit.edit_keyframes(ze, T, c_cfg, kf, source=f, attn=a, conv=c)
                x2, out2 = seen['a2']
                with torch.no_grad():
                    (q1, k1, v1), (q2, k2, v2) = qkv(a1, x1), qkv(a2, x2)
                    cand = {'Q1K1V2': chunks(by_hand, q1, k1, v2),
                            'Q2K2V2': torch.cat([by_hand(*(t.chunk(2)[i] for t in (q2, k2, v2))) for i in range(2)]),
                            'Q1K1V1': chunks(by_hand, q1, k1, torch.cat([v1, v1])),
                            'per frame': chunks(lambda q, k, v: by_hand(q, k, v, extended=False), q1, k1, v2)}
                want = 'Q1K1V2' if a else 'Q2K2V2'
                torch.testing.assert_close(out2, cand[want], atol=1e-5, rtol=0)
                assert all((out2 - o).abs().max() > 1e-2 for n, o in cand.items() if n != want), (a, c)
                assert torch.equal(keys.out[LAYER], out2.view(2, len(kf), *out2.shape[1:]))
        finally:
            for h in hooks: h.remove()
    # Q,K alone change the keyframe output (compared without conv injection, which alone would also change it)
    assert (eps[True, False] - eps[False, False]).abs().max() > 1e-4


# ---------------------------------------------------------------- 3. inputs in the UNet's dtype and device
def test_bf16_unet_takes_float32_inputs(nets):
    "float32 latents/prompts (and a BatchedSource's) into bfloat16 networks: cast by the control, bit for bit as cast by hand."
    bf = lambda x: x.to(torch.bfloat16)
    e1b, e2b = bf(copy.deepcopy(nets['eps1'])), bf(copy.deepcopy(nets['eps2']))
    zs, z, c_src, c_cfg = nets['z_src'][:2], nets['z'][:2], nets['c_src'], nets['c_cfg']
    with AttentionControl(e1b) as src, AttentionControl(e2b) as edit:
        _, f = src.record(zs, T, c_src)
        _, f_ref = src.record(bf(zs), T, bf(c_src))
        assert all(torch.equal(a[n], b[n]) for a, b in zip(f._maps(), f_ref._maps()) for n in a)
        e = edit.inject(z, T, c_cfg, source=f)
        assert e.dtype == torch.bfloat16 and torch.equal(e, edit.inject(bf(z), T, bf(c_cfg), source=f))
        assert torch.equal(edit.inject(z, T, c_cfg, source=f.to(torch.float32)), e)    # float32 features are cast too
    with TokenFlowControl(e1b) as ctl:
        kf = torch.tensor([0, 1])
        e, k = ctl.edit_keyframes(z, T, c_cfg, kf, source=BatchedSource(zs, c_src))
        e_ref, k_ref = ctl.edit_keyframes(bf(z), T, bf(c_cfg), kf, source=BatchedSource(bf(zs), bf(c_src)))
        assert torch.equal(e, e_ref)
        p = ctl.propagate(z, T, c_cfg, kf, source=BatchedSource(zs, c_src), keyframes=k)
        assert torch.equal(p, ctl.propagate(bf(z), T, bf(c_cfg), kf, source=BatchedSource(bf(zs), bf(c_src)), keyframes=k_ref))


@pytest.mark.parametrize('shared', [True, False])
def test_pipeline_edit_latents_unchanged_by_the_cast(shared):
    "The pipeline casts its inputs itself: the control's cast must hand them on as the same tensors, and z0 must not change."
    from ipfacediff.pipeline import IPFaceDiffPipeline, EditConfig
    dt = torch.bfloat16
    c = tiny_components(0).to(dtype=dt)
    pipe = IPFaceDiffPipeline(c, progress=False) if shared else IPFaceDiffPipeline(c, eps1=tiny_components(1).to(dtype=dt).unet, progress=False)
    gen = torch.Generator().manual_seed(0)
    ts = ddim_timesteps(3)
    traj = {t: torch.randn(5, 4, 8, 8, generator=gen) for t in ts}
    traj = {t: v if t == ts[0] else v.to(dt) for t, v in traj.items()}   # as `invert` keeps them: z_T float32, the rest in bf16
    cfg = EditConfig('add glasses', steps=3, inversion_steps=3, batch_size=2, size=64)
    real, calls = AttentionControl._to_input, []

    def spy(self, t):
        out = real(self, t)
        calls.append(out is t)
        return out
    with mock.patch.object(AttentionControl, '_to_input', spy): z = pipe.edit_latents(traj, cfg)
    # every input came back as the very tensor the pipeline gave: the edit is what it was without the cast
    assert len(calls) > 0 and all(calls), f'{calls.count(False)} of {len(calls)} pipeline inputs were copied by the control'
    assert z.dtype == torch.float32
    with mock.patch.object(AttentionControl, '_to_input', lambda self, t: t): z_nocast = pipe.edit_latents(traj, cfg)
    assert torch.equal(z, z_nocast)      # z0 is what it is with no cast at all
