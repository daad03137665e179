"ε1 → ε2 injection (07_injection) and TokenFlow keyframe editing / propagation (08_tokenflow) on tiny random UNets."
import copy
import os
from unittest import mock

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest
import torch
import torch.nn.functional as F

from ipfacediff.ddim import ddim_timesteps
from ipfacediff.injection import (AttentionControl, BatchedSource, Features, IPAttnProcessor, injection_schedule,
                                  resolve_attn_layers)
from ipfacediff.models import encode_prompt, tiny_components
from ipfacediff.propagation import (TokenFlowControl, extended_attention, frame_batches, nearest_neighbours,
                                    propagate_features, propagation_weights, sample_keyframes)
from ipfacediff.utils import UserError

T = 501


@pytest.fixture(scope='module')
def nets():
    torch.set_num_threads(1)
    c1, c2 = tiny_components(0), tiny_components(1)
    g = torch.Generator().manual_seed(0)
    return dict(c1=c1, eps1=c1.unet, eps2=c2.unet, c_src=encode_prompt(c1, ''),
                c_cfg=encode_prompt(c1, ['', 'a face with sunglasses']),
                z_src=torch.randn(3, 4, 16, 16, generator=g), z=torch.randn(3, 4, 16, 16, generator=g))


def plain(unet, z, t, c):
    c = c.expand(z.shape[0], -1, -1) if c.shape[0] == 1 else c
    with torch.no_grad(): return unet(z, t, encoder_hidden_states=c).sample


def no_ip_processors(unet):
    return not any(isinstance(p, IPAttnProcessor) for p in unet.attn_processors.values())


# ---------------------------------------------------------------- injection
def test_schedule():
    s = injection_schedule(ddim_timesteps(50))
    assert sum(a for a, _ in s.values()) == 25 and sum(c for _, c in s.values()) == 40
    assert list(s.values())[:25] == [(True, True)] * 25 and list(s.values())[-10:] == [(False, False)] * 10
    s = injection_schedule(ddim_timesteps(10), attn_t=0.2, conv_t=0.0)
    assert [a for a, _ in s.values()] == [True] * 2 + [False] * 8 and not any(c for _, c in s.values())
    with pytest.raises(UserError, match='conv_t'): injection_schedule([1], conv_t=-0.1)


def test_identical_copy_reproduces_eps1_exactly(nets):
    eps1, c = nets['eps1'], nets['c_src']
    twin = copy.deepcopy(eps1)
    with AttentionControl(eps1) as src, AttentionControl(twin) as edit:
        e1, feats = src.record(nets['z_src'], T, c)
        e2 = edit.inject(nets['z_src'], T, c, source=feats)
    assert torch.equal(e1, plain(eps1, nets['z_src'], T, c))   # the processor is the stock one without injection
    assert torch.equal(e2, e1)
    assert len(feats) == 3 and len(feats.q) == 8 and list(feats.conv) == ['up_blocks.1.resnets.1']


def test_every_hooked_layer_once_per_forward(nets):
    eps2 = nets['eps2']
    with AttentionControl(nets['eps1']) as src, AttentionControl(eps2) as edit:
        _, f = src.record(nets['z_src'], T, nets['c_src'])
        edit.inject(nets['z'], T, nets['c_cfg'], source=f)
        assert set(edit.calls) == set(edit.hooked) and set(edit.calls.values()) == {1}
        assert len(edit.hooked) == 9
        assert sum(isinstance(p, IPAttnProcessor) for p in eps2.attn_processors.values()) == 8
    with TokenFlowControl(eps2) as tf:
        tf.record(nets['z'], T, nets['c_src'])
        assert set(tf.calls) == set(tf.hooked) and set(tf.calls.values()) == {1} and len(tf.hooked) == 17


def test_injection_changes_other_network_only_inside_window(nets):
    eps1, eps2, z, c_cfg = nets['eps1'], nets['eps2'], nets['z'], nets['c_cfg']
    ts = ddim_timesteps(4)
    sched = injection_schedule(ts)             # attn: first 2 steps, conv: first 3
    zz, cc = torch.cat([z, z]), c_cfg.repeat_interleave(3, 0)
    with AttentionControl(eps1) as src, AttentionControl(eps2) as edit:
        changed = []
        for t in ts:
            _, f = src.record(nets['z_src'], t, nets['c_src'])
            e = edit.inject(z, t, c_cfg, source=f, attn=sched[t][0], conv=sched[t][1])
            changed.append(not torch.equal(e, plain(eps2, zz, t, cc)))
        ref = plain(eps2, zz, ts[0], cc)
        _, f = src.record(nets['z_src'], ts[0], nets['c_src'])
        assert (edit.inject(z, ts[0], c_cfg, source=f, attn=True, conv=False) - ref).abs().max() > 1e-4
        assert (edit.inject(z, ts[0], c_cfg, source=f, attn=False, conv=True) - ref).abs().max() > 1e-4
    assert changed == [True, True, True, False]


def test_injects_eps1_qk_with_eps2_v_and_eps1_resnet_inside_windows(nets):
    "By hand from one layer's inputs: ε2's attn1 output is softmax(Q1 K1ᵀ/√d) V2 inside τ_attn, its own after; h1 flows on inside τ_conv."
    eps1, eps2, z, c_cfg = nets['eps1'], nets['eps2'], nets['z'], nets['c_cfg']
    layer, res = 'up_blocks.2.attentions.1.transformer_blocks.0.attn1', 'up_blocks.1.resnets.1'
    a1, a2 = (dict(u.named_modules())[layer] for u in (eps1, eps2))
    conv2 = dict(eps2.named_modules())[res].conv2

    def qkv(a, x): return [t.view(*x.shape[:2], a.heads, -1).transpose(1, 2) for t in (a.to_q(x), a.to_k(x), a.to_v(x))]

    def by_hand(q, k, v):
        o = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        return a2.to_out[1](a2.to_out[0](o.transpose(1, 2).flatten(2)))
    two = lambda t: torch.cat([t, t])   # source rows for both prompt chunks, chunk-major
    ts = ddim_timesteps(4)
    sched = injection_schedule(ts)      # attn: first 2 steps, conv: first 3
    assert [sched[t] for t in ts] == [(True, True)] * 2 + [(False, True), (False, False)]
    seen = {}
    spy = lambda key: (lambda m, args, out: seen.__setitem__(key, (args[0], out)))
    with AttentionControl(eps1) as src, AttentionControl(eps2) as edit:
        hooks = [a1.register_forward_hook(spy('a1')), a2.register_forward_hook(spy('a2')), conv2.register_forward_hook(spy('h'))]
        try:
            for t in ts:
                a, c = sched[t]
                _, f = src.record(nets['z_src'], t, nets['c_src'])
                x1 = seen['a1'][0]
                edit.inject(z, t, c_cfg, source=f, attn=a, conv=c)
                (x2, out2), (h_in, h_out) = seen['a2'], seen['h']
                with torch.no_grad():
                    (q1, k1, v1), (q2, k2, v2) = qkv(a1, x1), qkv(a2, x2)
                    cand = {'Q1K1V2': by_hand(two(q1), two(k1), v2), 'Q2K2V2': by_hand(q2, k2, v2),
                            'Q1K1V1': by_hand(two(q1), two(k1), two(v1))}
                    own_h = F.conv2d(h_in, conv2.weight, conv2.bias, padding=conv2.padding)
                want = 'Q1K1V2' if a else 'Q2K2V2'
                torch.testing.assert_close(out2, cand[want], atol=1e-5, rtol=0)
                assert all((out2 - o).abs().max() > 1e-2 for n, o in cand.items() if n != want), t
                h1 = two(f.conv[res])
                assert (h1 - own_h).abs().max() > 1e-2
                if c: assert torch.equal(h_out, h1), t
                else: torch.testing.assert_close(h_out, own_h, atol=1e-6, rtol=0)
        finally:
            for h in hooks: h.remove()


def test_processors_restored(nets):
    eps2 = nets['eps2']
    procs, before = dict(eps2.attn_processors), plain(eps2, nets['z'], T, nets['c_src'])
    with pytest.raises(KeyboardInterrupt):
        with TokenFlowControl(eps2):
            assert not no_ip_processors(eps2)
            raise KeyboardInterrupt
    assert all(eps2.attn_processors[n] is p for n, p in procs.items())
    assert sum(len(m._forward_hooks) for m in eps2.modules()) == 0
    assert torch.equal(plain(eps2, nets['z'], T, nets['c_src']), before)


def test_bad_layer_names(nets):
    eps2 = nets['eps2']
    with pytest.raises(UserError, match=r"'up_blocks\.1\.attentions\.9'") as e:
        AttentionControl(eps2, attn_layers=['up_blocks.1.attentions.1', 'up_blocks.1.attentions.9'])
    assert '\n' not in str(e.value)
    with pytest.raises(UserError, match=r"'up_blocks\.1\.resnet\.1'"): AttentionControl(eps2, conv_layers='up_blocks.1.resnet.1')
    with pytest.raises(UserError, match='cross-attention'):
        TokenFlowControl(eps2, tokenflow_layers=['up_blocks.1.attentions.1.transformer_blocks.0.attn2'])
    assert no_ip_processors(eps2)
    assert len(resolve_attn_layers(eps2, 'all')) == 16


def test_misuse_is_reported(nets):
    eps2 = nets['eps2']
    with AttentionControl(eps2) as edit:
        with pytest.raises(ValueError, match='needs ε1'): edit.inject(nets['z'], T, nets['c_cfg'], source=Features())
        with pytest.raises(RuntimeError, match='already'):
            with AttentionControl(eps2): pass
    with AttentionControl(nets['eps1']) as src: _, f = src.record(nets['z_src'], T, nets['c_src'])  # no tokens recorded
    with TokenFlowControl(eps2) as tf:
        with pytest.raises(ValueError, match='input tokens'):
            tf.edit_keyframes(nets['z'][:2], T, nets['c_cfg'], [0, 2], source=f.select([0, 2]))
    with pytest.raises(RuntimeError, match='not active'): AttentionControl(eps2).record(nets['z'], T, nets['c_src'])
    assert no_ip_processors(eps2)


def test_batched_mode_matches_separate_forwards(nets):
    eps1 = nets['eps1']
    with AttentionControl(eps1) as ctl:
        _, f = ctl.record(nets['z_src'], T, nets['c_src'])
        sep = ctl.inject(nets['z'], T, nets['c_cfg'], source=f)
        bat = ctl.inject(nets['z'], T, nets['c_cfg'], source=BatchedSource(nets['z_src'], nets['c_src']))
    assert bat.shape == (6, 4, 16, 16)
    torch.testing.assert_close(bat, sep, atol=1e-4, rtol=0)


def test_features_select_cat(nets):
    with TokenFlowControl(nets['eps1']) as src: _, f = src.record(nets['z_src'], T, nets['c_src'])
    g = Features.cat([f.select([0]), f.select([1, 2])])
    assert len(g) == 3 and all(torch.equal(a[n], b[n]) for a, b in zip(f._maps(), g._maps()) for n in a)
    assert f.nbytes == g.nbytes > 0


# ---------------------------------------------------------------- TokenFlow
def test_keyframes_and_batches():
    g = torch.Generator().manual_seed(3)
    draws = [sample_keyframes(21, 8, g) for _ in range(5)]
    assert all(len(k) == 3 and 0 <= k[0] < 8 <= k[1] < 16 <= k[2] < 21 for k in draws)
    assert len({tuple(k.tolist()) for k in draws}) > 1
    assert torch.equal(sample_keyframes(21, 8, torch.Generator().manual_seed(3)), draws[0])
    assert [b.tolist() for b in frame_batches(5, 2)] == [[0, 1], [2, 3], [4]]


def test_nn_field_and_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 8, generator=g)
    assert torch.equal(nearest_neighbours(x, x, chunk_size=16), torch.arange(50).expand(4, -1))
    perm = torch.randperm(50, generator=g)
    assert torch.equal(nearest_neighbours(x[2:3], x[2:3, perm], [0]), torch.argsort(perm)[None])
    jm, jp, wm = propagation_weights(torch.arange(10), [1, 5, 9])
    torch.testing.assert_close(wm, torch.tensor([1, 1, .75, .5, .25, 1, .75, .5, .25, 1.]))
    assert jm.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2] and jp.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    # eq. 4 on hand-made keyframe outputs: identical tokens → the weighted sum of the two keyframes
    kf_out = torch.stack([torch.full((50, 8), 1.0), torch.full((50, 8), 3.0)])[None]  # (m=1, K=2, L, C)
    out = propagate_features(kf_out, x[:2], x[:1].expand(3, -1, -1), [0, 1, 4], [0, 4])
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 1.5, 3.0]))


def test_eq4_gathers_the_matched_token_of_each_keyframe():
    "Per-token keyframe outputs and known non-identity fields: eq. 4 must take T(k)[γ_k(p)], weighted by hand-written w⁻."
    g = torch.Generator().manual_seed(4)
    L, kf_idx, frames = 12, torch.tensor([2, 6, 10]), torch.tensor([0, 3, 4, 6, 9, 12])
    base = torch.randn(L, 8, generator=g)
    pi = torch.stack([torch.randperm(L, generator=g) for _ in kf_idx])          # keyframe k's token q = base[pi[k, q]]
    rho, rho2 = (torch.stack([torch.randperm(L, generator=g) for _ in frames]) for _ in range(2))  # frame row r's token p = base[rho[r, p]]
    kf_out = (1000 * torch.arange(2)[:, None, None, None] + 100 * torch.arange(3)[None, :, None, None]
              + torch.arange(L)[None, None, :, None] + 0.5 * torch.arange(2)).float()   # (m=2, K=3, L, C=2)
    # (row, past keyframe, future keyframe, w⁻): before the first, between, on a keyframe, after the last
    plan = [(0, 0, 0, 1.), (1, 0, 1, .75), (2, 0, 1, .5), (3, 1, 1, 1.), (4, 1, 2, .25), (5, 2, 2, 1.)]
    gamma = lambda k, r, rho: torch.argsort(pi[k])[rho[r]]

    def eq4(rho):
        return torch.stack([w * kf_out[:, a, gamma(a, r, rho)] + (1 - w) * kf_out[:, b, gamma(b, r, rho)]
                            for r, a, b, w in plan], 1)
    assert not any(torch.equal(gamma(k, r, rho), torch.arange(L)) for r, a, b, _ in plan for k in {a, b})
    got = propagate_features(kf_out, base[pi], base[rho], frames, kf_idx, chunk_size=5)
    assert got.shape == (2, 6, L, 2)
    assert torch.equal(got, eq4(rho))
    assert got[0, 1, 0, 0] == .75 * gamma(0, 1, rho)[0] + .25 * (100 + gamma(1, 1, rho)[0])   # frame 3, token 0
    got2 = propagate_features(kf_out, torch.stack([base[pi]] * 2), torch.stack([base[rho], base[rho2]]), frames, kf_idx)
    assert torch.equal(got2[0], eq4(rho)[0]) and torch.equal(got2[1], eq4(rho2)[1])   # one field per prompt chunk


def test_extended_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 2, 6, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(extended_attention(q[:1], k[:1], v[:1]), F.scaled_dot_product_attention(q[:1], k[:1], v[:1]))
    kr, vr = (t.transpose(0, 1).reshape(1, 2, 24, 4).expand(4, -1, -1, -1) for t in (k, v))
    torch.testing.assert_close(extended_attention(q, k, v), F.scaled_dot_product_attention(q, kr, vr))
    torch.testing.assert_close(extended_attention(q, k, v, chunk_size=5), extended_attention(q, k, v))


def test_one_keyframe_is_plain_self_attention(nets):
    z1 = nets['z'][:1]
    with TokenFlowControl(nets['eps1']) as src, TokenFlowControl(nets['eps2']) as edit:
        _, f = src.record(z1, T, nets['c_src'])
        e, keys = edit.edit_keyframes(z1, T, nets['c_cfg'], [0], source=f, attn=False, conv=False)
    torch.testing.assert_close(e, plain(nets['eps2'], z1.expand(2, -1, -1, -1), T, nets['c_cfg']), atol=1e-5, rtol=0)
    assert len(keys.out) == 16 and len(keys.tokens) == 16


def test_static_video_propagates_keyframe_output_exactly(nets):
    eps2 = nets['eps2']
    static = nets['z'][:1].expand(6, -1, -1, -1).contiguous()
    mods = dict(eps2.named_modules())
    with TokenFlowControl(nets['eps1']) as src, TokenFlowControl(eps2) as edit:
        _, f = src.record(static, T, nets['c_src'])
        e_kf, keys = edit.edit_keyframes(static[2:3], T, nets['c_cfg'], [2], source=f.select([2]))
        seen = {}
        hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o)) for n in edit.token_names]
        try: e = edit.propagate(static, T, nets['c_cfg'], torch.arange(6), source=f, keyframes=keys)
        finally:
            for h in hooks: h.remove()
    assert len(seen) == 16
    for n, o in seen.items(): assert torch.equal(o.view(2, 6, *o.shape[1:]), keys.out[n].expand(-1, 6, -1, -1)), n
    torch.testing.assert_close(e.view(2, 6, 4, 16, 16), e_kf[:, None].expand(-1, 6, -1, -1, -1), atol=1e-5, rtol=0)


def test_extended_attention_memory_is_linear_in_keyframes(nets):
    def kv_bytes(K):
        seen, real = [], F.scaled_dot_product_attention
        def spy(q, k, v, *a, **kw):
            if q.shape[2] == k.shape[2]:  # self-attention (cross-attention keys are the 77 text tokens)
                seen.append((k.shape, k.numel() * k.element_size() + v.numel() * v.element_size()))
            return real(q, k, v, *a, **kw)
        zk = torch.randn(K, 4, 16, 16, generator=torch.Generator().manual_seed(K))
        with TokenFlowControl(nets['eps1']) as src, TokenFlowControl(nets['eps2']) as edit:
            _, f = src.record(zk, T, nets['c_src'])
            with mock.patch.object(F, 'scaled_dot_product_attention', spy):
                edit.edit_keyframes(zk, T, nets['c_cfg'][1:], torch.arange(K), source=f)
        assert all(s[0][0] == 1 for s in seen), 'keys must be one sequence, not one copy per keyframe'
        assert max(s[0][2] for s in seen) == K * 256
        return sum(s[1] for s in seen)
    b = {K: kv_bytes(K) for K in (1, 3, 6)}
    assert b[3] == 3 * b[1] and b[6] == 6 * b[1]


def test_composition_and_batched_tokenflow(nets):
    eps1, eps2, c_cfg = nets['eps1'], nets['eps2'], nets['c_cfg']
    zs, ze = nets['z_src'], nets['z']
    kf = torch.tensor([0, 2])
    with TokenFlowControl(eps1) as ctl:   # ε1 ≡ ε2: batched equals separate forwards
        _, fk = ctl.record(zs[kf], T, nets['c_src'])
        e_sep, k_sep = ctl.edit_keyframes(ze[kf], T, c_cfg, kf, source=fk)
        e_bat, k_bat = ctl.edit_keyframes(ze[kf], T, c_cfg, kf, source=BatchedSource(zs[kf], nets['c_src']))
        _, fb = ctl.record(zs, T, nets['c_src'])
        p_sep = ctl.propagate(ze, T, c_cfg, [0, 1, 2], source=fb, keyframes=k_sep)
        p_bat = ctl.propagate(ze, T, c_cfg, [0, 1, 2], source=BatchedSource(zs, nets['c_src']), keyframes=k_bat)
    torch.testing.assert_close(e_bat, e_sep, atol=1e-4, rtol=0)
    torch.testing.assert_close(p_bat, p_sep, atol=1e-4, rtol=0)
    with TokenFlowControl(eps1) as src, TokenFlowControl(eps2) as edit:   # injection acts inside extended attention
        _, fk = src.record(zs[kf], T, nets['c_src'])
        on, _ = edit.edit_keyframes(ze[kf], T, c_cfg, kf, source=fk, attn=True, conv=False)
        off, _ = edit.edit_keyframes(ze[kf], T, c_cfg, kf, source=fk, attn=False, conv=False)
        assert (on - off).abs().max() > 1e-4
    assert no_ip_processors(eps1) and no_ip_processors(eps2)


def test_no_source_uses_own_tokens(nets):
    eps2 = nets['eps2']
    static = nets['z'][:1].expand(4, -1, -1, -1).contiguous()
    with TokenFlowControl(eps2) as edit:
        e_kf, keys = edit.edit_keyframes(static[1:2], T, nets['c_cfg'], [1], source=None, attn=False, conv=False)
        e = edit.propagate(static, T, nets['c_cfg'], torch.arange(4), source=None, keyframes=keys, attn=False, conv=False)
        with pytest.raises(ValueError, match='needs ε1'):
            edit.propagate(static, T, nets['c_cfg'], torch.arange(4), source=None, keyframes=keys, attn=True, conv=False)
    assert all(v.shape[:2] == (2, 1) for v in keys.tokens.values())   # one field per prompt chunk
    torch.testing.assert_close(e.view(2, 4, 4, 16, 16), e_kf[:, None].expand(-1, 4, -1, -1, -1), atol=1e-5, rtol=0)
