"""Second mutation review of 07_injection and 08_tokenflow: each test fails on at least one hand-made change to
`ipfacediff/injection.py` or `ipfacediff/propagation.py` that the rest of tests/ and the notebooks' checks let through; its
docstring names them. What they pin: `injection_schedule` for τ = 1 and tensor timesteps; `resolve_attn_layers` naming a
layer once however often it is asked for; `Features`' length, cast, size and joining; `IPAttnProcessor` giving diffusers' stock
`AttnProcessor2_0` result on real `Attention` modules of every kind it accepts (4-D input, group norm, residual, output
rescale, attention mask, q/k norm, a context); more than two prompt chunks, 2-D prompt embeddings; a control that is
inactive again after its `with`; the input dtype of a module without diffusers' `dtype`; `inject`'s defaults; in
08_tokenflow the argument checks, per-chunk fields away from frame 0, the weights made once per forward and the chunk
sizes passed on. Tiny random UNets (`two_branches`) and real diffusers `Attention` modules, offline, one core."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ipfacediff import propagation
from ipfacediff.injection import (AttentionControl, BatchedSource, Features, IPAttnProcessor, _input_dtype_device,
                                  injection_schedule, resolve_attn_layers)
from ipfacediff.propagation import (Keyframes, TokenFlowControl, frame_batches, local_weights, nearest_neighbours,
                                    propagate_features, propagation_weights)
from shared import one_line_error, two_branches

torch.set_num_threads(1)
T = 501
A1 = 'up_blocks.1.attentions.1.transformer_blocks.0.attn1'


@pytest.fixture(scope='module')
def nets():
    return two_branches(2, 'a face with glasses')


# ---------------------------------------------------------------- 07: schedule and layer names
def test_schedule_takes_tau_one_and_tensor_timesteps():
    """τ = 1 (inject at every step) is a fraction of the steps and allowed; the schedule of a tensor of timesteps is keyed
    by plain ints, so `sched[t]` finds an int timestep. Kills: the bound check `0 <= v < 1`; `ts = list(timesteps)` (0-d
    tensor keys, which hash by identity)."""
    s = injection_schedule(range(10, 0, -1), attn_t=1.0, conv_t=1.0)
    assert list(s.values()) == [(True, True)] * 10
    s = injection_schedule(torch.tensor([751, 501, 251, 1]))
    assert list(s) == [751, 501, 251, 1] and all(type(t) is int for t in s)
    assert s[501] == (True, True) and s[251] == (False, True)


def test_a_layer_named_twice_is_hooked_once_and_a_layer_without_attn1_is_refused(nets):
    """A transformer and its own attn1 (or one name twice) resolve to that attn1 once, and the control carries one
    processor for it; a module without self-attention (a resnet) is a one-line UserError, not a control that silently
    injects nothing. Kills: `out += found` (duplicates kept); the `not found` check dropped."""
    u = nets['eps2']
    one_line_error(lambda: resolve_attn_layers(u, ['up_blocks.1.resnets.1']), "'up_blocks.1.resnets.1' has no self-attention")
    assert resolve_attn_layers(u, ['up_blocks.1.attentions.1', A1, 'up_blocks.1.attentions.1']) == [A1]
    ctl = AttentionControl(u, attn_layers=[A1, 'up_blocks.1.attentions.1'], conv_layers=())
    assert ctl.processor_names == [A1] and ctl.hooked == [A1]


# ---------------------------------------------------------------- 07: Features
def test_features_length_cast_and_size():
    """`len` counts rows of whichever map holds something (resnet features alone too); `to(dtype=…)` casts every map;
    `nbytes` counts bytes, not elements. `cat` joins a generator of recordings. Kills: `__len__` looking only at q, k, tokens; `cat` not listing its argument
    (a generator is used up by its first pass); `to` dropping keyword arguments;
    `Features.nbytes` / `Keyframes.nbytes` summing `numel()` without the element size."""
    f = Features(q={'a': torch.zeros(2, 1, 4, 8)}, conv={'r': torch.zeros(2, 3, 4, 4, dtype=torch.float16)})
    assert len(Features(conv={'r': torch.zeros(3, 2, 4, 4)})) == 3 and len(Features()) == 0
    c = Features.cat(f.select([i]) for i in (1, 0))           # any iterable of recordings, e.g. a generator
    assert len(c) == 2 and c.nbytes == f.nbytes
    assert f.nbytes == 64 * 4 + 96 * 2
    h = f.to(dtype=torch.float16)
    assert all(v.dtype == torch.float16 for d in h._maps() for v in d.values()) and h.nbytes == (64 + 96) * 2
    kf = Keyframes(idx=torch.tensor([0]), tokens={'a': torch.zeros(1, 4, 8)}, out={'a': torch.zeros(2, 1, 4, 8, dtype=torch.bfloat16)})
    assert kf.nbytes == 32 * 4 + 64 * 2


# ---------------------------------------------------------------- 07: the processor is the stock one without injection
def _parity(unet, attn, *args, **kw):
    "IPAttnProcessor (control with no layers of its own: no recording, no injection) against diffusers' AttnProcessor2_0."
    ctl = AttentionControl(unet, attn_layers=(), conv_layers=())
    with torch.no_grad():
        got, want = IPAttnProcessor('probe', ctl)(attn, *args, **kw), AttnProcessor2_0()(attn, *args, **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert ctl.calls['probe'] == 1


def test_processor_is_stock_attention_on_every_kind_of_layer(nets):
    """On real diffusers `Attention` modules the processor gives what `AttnProcessor2_0` gives: a VAE-style layer (4-D
    non-square input, group norm, residual connection, output rescale), an attention mask, q/k layer norm, a context of
    its own width. Kills: the 4-D input flattened without the transpose; the output reshaped without it; the residual
    dropped; the rescale dropped; the group norm skipped; the mask not passed on; `norm_q` or `norm_k` skipped; `ctx = x`;
    the spatial norm (MoVQ-style layers) skipped."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vae = Attention(8, heads=2, dim_head=4, norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0, bias=True)
    _parity(nets['eps1'], vae, torch.randn(2, 8, 3, 5, generator=g))
    plain = Attention(8, heads=2, dim_head=4)
    mask = torch.zeros(2, 1, 6)
    mask[0, 0, 4:], mask[1, 0, :2] = -1e4, -1e4
    _parity(nets['eps1'], plain, torch.randn(2, 6, 8, generator=g), attention_mask=mask)
    qk = Attention(8, heads=2, dim_head=4, qk_norm='layer_norm')
    _parity(nets['eps1'], qk, torch.randn(2, 6, 8, generator=g))
    cross = Attention(8, cross_attention_dim=5, heads=2, dim_head=4)
    _parity(nets['eps1'], cross, torch.randn(2, 6, 8, generator=g), encoder_hidden_states=torch.randn(2, 7, 5, generator=g))
    movq = Attention(32, heads=2, dim_head=4, spatial_norm_dim=3)      # its SpatialNorm has 32 groups
    _parity(nets['eps1'], movq, torch.randn(2, 32, 3, 5, generator=g), temb=torch.randn(2, 3, 2, 2, generator=g))


# ---------------------------------------------------------------- 07: prompt chunks and embeddings
def test_three_prompt_chunks_and_2d_prompts(nets):
    """Prompt chunks are independent: ε2 under injection with three prompt chunks is, chunk by chunk, ε2 with each alone;
    a 2-D prompt embedding (77, C) is the one-chunk (1, 77, C), for ε2's prompt and a BatchedSource's. Kills: source rows
    tiled for two chunks only; `_as_cond` not adding the chunk axis; the BatchedSource's prompt used without it."""
    eps1, eps2, zs, z, c, cs = nets['eps1'], nets['eps2'], nets['z_src'], nets['z'], nets['c_cfg'], nets['c_src']
    c3 = torch.cat([c, 0.5 * c[1:]])
    with AttentionControl(eps1) as src, AttentionControl(eps2) as edit:
        _, f = src.record(zs, T, cs)
        e3 = edit.inject(z, T, c3, source=f)
        parts = [edit.inject(z, T, c3[i:i + 1], source=f) for i in range(3)]
        assert torch.equal(edit.inject(z, T, c3[2], source=f), parts[2])
    assert e3.shape == (6, 4, 16, 16)
    torch.testing.assert_close(e3, torch.cat(parts), atol=1e-5, rtol=0)
    with AttentionControl(eps1) as ctl:
        want = ctl.inject(z, T, c, source=BatchedSource(zs, cs))
        assert torch.equal(ctl.inject(z, T, c, source=BatchedSource(zs, cs[0])), want)


# ---------------------------------------------------------------- 07: the context manager and defaults
def test_control_is_inactive_after_its_with_and_can_be_entered_again(nets):
    """After `with ctl:` ends (normally or by an exception) `ctl.forward` refuses to run on the restored network, and the
    same control can be entered again. Kills: `__exit__` not marking the control inactive (`_orig` kept)."""
    eps2, z, c = nets['eps2'], nets['z'], nets['c_src']
    ctl = AttentionControl(eps2)
    with ctl: _, f1 = ctl.record(z, T, c)
    with pytest.raises(RuntimeError, match='not active'): ctl.record(z, T, c)
    with pytest.raises(ZeroDivisionError):
        with ctl: 1 / 0
    with pytest.raises(RuntimeError, match='not active'): ctl.inject(z, T, c, source=f1)
    with ctl: _, f2 = ctl.record(z, T, c)
    assert all(torch.equal(f1.q[n], f2.q[n]) for n in f1.q)


def test_input_dtype_of_a_module_without_diffusers_dtype():
    """A network without diffusers' `dtype`/`device` properties takes inputs in its first floating parameter's dtype.
    Kills: the fallback answering float32."""
    assert _input_dtype_device(torch.nn.Linear(2, 2).double()) == (torch.float64, torch.device('cpu'))


def test_inject_defaults_to_both_injections(nets):
    """`inject` without `attn`/`conv` injects Q,K and the resnet features. Kills: `conv` defaulting to False."""
    with AttentionControl(nets['eps1']) as src, AttentionControl(nets['eps2']) as edit:
        _, f = src.record(nets['z_src'], T, nets['c_src'])
        e = edit.inject(nets['z'], T, nets['c_cfg'], source=f)
        assert torch.equal(e, edit.inject(nets['z'], T, nets['c_cfg'], source=f, attn=True, conv=True))
        assert (e - edit.inject(nets['z'], T, nets['c_cfg'], source=f, attn=True, conv=False)).abs().max() > 1e-4


# ---------------------------------------------------------------- 08: argument checks
def test_tokenflow_argument_checks(nets):
    """Zero frames, repeated or no keyframes, unsorted keyframe indices, and latents that do not match the indices are
    named errors; zero frames to propagate read no keyframe. Kills: `frame_batches` accepting 0 frames or batch size 0; duplicate or
    empty keyframe lists accepted by `propagation_weights`; `local_weights` failing on no frames; `edit_keyframes` not
    checking the order or the count; `propagate` not checking the count."""
    one_line_error(lambda: frame_batches(0, 8), '0 frames')
    one_line_error(lambda: frame_batches(5, 0), 'batch size 0')
    with pytest.raises(ValueError, match='distinct and sorted'): propagation_weights([1, 3], [2, 2])
    with pytest.raises(ValueError, match='distinct and sorted'): propagation_weights([1], [])
    span, (jm, jp, wm) = local_weights(torch.tensor([], dtype=torch.long), torch.tensor([1, 3]))
    assert (span.start, span.stop) == (0, 0) and len(jm) == len(jp) == len(wm) == 0
    z, c = nets['z'], nets['c_cfg']
    with TokenFlowControl(nets['eps2']) as edit:
        with pytest.raises(ValueError, match='distinct and sorted'): edit.edit_keyframes(z, T, c, [1, 0], source=None, attn=False, conv=False)
        with pytest.raises(ValueError, match='2 keyframe latents for 1'): edit.edit_keyframes(z, T, c, [0], source=None, attn=False, conv=False)
        _, keys = edit.edit_keyframes(z[:1], T, c, [0], source=None, attn=False, conv=False)
        with pytest.raises(ValueError, match='2 latents for 3 frame'):
            edit.propagate(z, T, c, [0, 1, 2], source=None, keyframes=keys, attn=False, conv=False)


# ---------------------------------------------------------------- 08: eq. 4
def test_nn_field_default_pairs_frame_i_with_keyframe_i():
    """Without `index`, frame i is matched against keyframe i, also when y holds more rows than x. Kills: the default
    index running over y's rows."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 10, 6, generator=g), torch.randn(3, 10, 6, generator=g)
    assert torch.equal(nearest_neighbours(x, y), nearest_neighbours(x, y[:2]))
    assert torch.equal(nearest_neighbours(x, y), nearest_neighbours(x, y, [0, 1]))


def test_a_batched_keyframe_pass_keeps_copies_of_the_source_tokens(nets):
    """With a BatchedSource the keyframe store's tokens are copies of the source rows alone, not views that keep the whole
    batch's (3× larger) attn1 input of every layer alive for the whole propagation. Kills: `_field_tokens` returning
    `x[:n_source]` without `_keep`'s copy."""
    kf = torch.tensor([0, 1])
    with TokenFlowControl(nets['eps1']) as ctl:
        _, keys = ctl.edit_keyframes(nets['z'], T, nets['c_cfg'], kf, source=BatchedSource(nets['z_src'], nets['c_src']),
                                     attn=False, conv=False)
    assert len(keys.tokens) == 16 and all(v.shape[0] == 2 for v in keys.tokens.values())
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in keys.tokens.values())


def test_per_chunk_fields_away_from_frame_0():
    """With one field per prompt chunk (4-D tokens) the keyframe slice of frames 9–12 (keyframes 6, 10, 14 of 2, 6, 10,
    14) is taken on the keyframe axis: the result is eq. 4 over all keyframes, also for frames not in order. Kills: the
    slice applied to the first (chunk) axis of 4-D tokens; the slice bounds taken from the first and last frame's
    keyframes instead of the min and max."""
    g = torch.Generator().manual_seed(0)
    kf, frames = torch.tensor([2, 6, 10, 14]), torch.arange(9, 13)
    ko, ky, xt = torch.randn(2, 4, 10, 3, generator=g), torch.randn(2, 4, 10, 6, generator=g), torch.randn(2, 4, 10, 6, generator=g)
    want = propagate_features(ko, ky, xt, frames, kf, weights=propagation_weights(frames, kf))
    assert torch.equal(propagate_features(ko, ky, xt, frames, kf), want)
    shuffled = torch.tensor([12, 9, 11, 10])                   # any order: frame r still gets eq. 4 of its own index
    want = propagate_features(ko, ky, xt, shuffled, kf, weights=propagation_weights(shuffled, kf))
    assert torch.equal(propagate_features(ko, ky, xt, shuffled, kf), want)


def test_weights_made_once_per_forward_and_chunk_sizes_reach_the_kernels(nets, monkeypatch):
    """eq. 4's weights are made by the first TokenFlow layer and reused by the other 15 in the same forward (one host
    copy per forward, not per layer), and the control's `chunk_size` / `nn_chunk_size` (memory bounds) reach extended
    attention and the NN field of every layer. Kills: `local_weights` called by every layer; `nn_chunk_size` or
    `chunk_size` not passed on (the default used)."""
    seen = {'local_weights': [], 'extended_attention': [], 'nearest_neighbours': []}
    for name, pos in (('local_weights', None), ('extended_attention', 3), ('nearest_neighbours', 3)):
        real = getattr(propagation, name)
        def wrap(*a, real=real, name=name, pos=pos, **k):
            seen[name].append(None if pos is None else (a[pos] if len(a) > pos else k['chunk_size']))
            return real(*a, **k)
        monkeypatch.setattr(propagation, name, wrap)
    with TokenFlowControl(nets['eps2'], chunk_size=100, nn_chunk_size=7) as edit:
        _, keys = edit.edit_keyframes(nets['z'], T, nets['c_cfg'], [0, 1], source=None, attn=False, conv=False)
        edit.propagate(nets['z'], T, nets['c_cfg'], [0, 1], source=None, keyframes=keys, attn=False, conv=False)
    assert len(keys.out) == 16 and len(seen['local_weights']) == 1
    assert seen['extended_attention'] == [100] * 32                 # 16 layers × 2 prompt chunks
    assert seen['nearest_neighbours'] == [7] * 64                    # 16 layers × 2 chunks × (past, future)
