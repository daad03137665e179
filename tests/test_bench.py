"""`ipfacediff bench` (issue 7): the per-stage report, the UNet-call budget, SD 2.1's size and FLOPs counted on
the meta device, keyframe groups (identical to the all-keyframes step when the window covers them, bounded
otherwise), batched LoRA branches, and bad input refused with exit code 2."""
import json, os, shutil, subprocess, sys, types
from pathlib import Path
from unittest import mock
import numpy as np, pytest, torch
from ipfacediff.utils import data_path

from cli_helpers import run_cli
STAGES = {'track/align', 'encode', 'inversion', 'edit', 'decode', 'paste-back', 'write'}

def cli(*args, timeout=300):
    "`ipfacediff bench ARGS` in a subprocess, one torch thread."
    return run_cli('bench', *args, env={'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}, timeout=timeout)[0]

def test_tiny_bench_json(tmp_path):
    out = tmp_path / 'b.json'
    r = cli('--config', 'tiny', '--frames', '16', '--size', '128', '--json', str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    run = rep['runs'][0]
    assert run['frames'] == 16 and STAGES <= set(run['stages'])
    for name, st in run['stages'].items():
        assert st['seconds'] >= 0 and abs(st['s_per_frame'] * 16 - st['seconds']) < 1e-9 and st['peak_rss_mb'] > 0
    assert run['budget_ok'] and run['unet_calls'] == run['budget']
    assert run['budget'] == {'inversion': 160, 'edit': 320, 'keyframes': 40, 'source': 144}   # 16 frames, 10 + 10 steps, 2 keyframes
    assert run['stages']['inversion']['unet_evals'] == 160 and run['stages']['edit']['unet_evals'] == 504
    fl = rep['flops_per_eval']
    assert run['stages']['inversion']['flops'] == 160 * fl['unet'] and run['stages']['decode']['flops'] == 16 * fl['vae_decode']
    for s in ('encode', 'inversion', 'edit', 'decode'):
        st = run['stages'][s]
        assert st['achieved_tflops'] > 0 and st['floor_ratio'] >= 1 and abs(st['floor_ratio'] - st['seconds'] / st['floor_s']) < 1e-9
    assert rep['peak_tflops_measured'] > 0 and rep['commit'] and rep['date'] and len(rep['load_avg']) == 3
    assert '16 frames' in r.stdout and '= budget' in r.stdout

def test_sd21_size_and_flops_on_meta():
    from ipfacediff.bench import sd21_components, count_flops, n_params
    sd = sd21_components('meta')
    assert next(sd.unet.parameters()).device.type == 'meta'
    assert abs(n_params(sd.unet) / 1e6 - 865.9) < 0.5            # SD 2.1's UNet: 865.9 M parameters
    assert abs(n_params(sd.vae) / 1e6 - 83.65) < 0.1 and abs(n_params(sd.text_encoder) / 1e6 - 340.4) < 0.5
    f = count_flops(sd, 512)
    assert abs(f['unet'] / 1e12 - 0.80) < 0.02 and abs(f['vae_encode'] / 1e12 - 1.12) < 0.02 and abs(f['vae_decode'] / 1e12 - 2.51) < 0.02
    assert 0.05 < f['selfattn'] / f['unet'] < 0.25

def _all_keyframes_step(self, z, z_src, t, t_next, conds, cfg, window, generator, ctl2, ctl1=None, step=0):
    "The editing step before keyframe groups (all keyframes in one pass, then every batch against all); shared branches."
    from ipfacediff.propagation import sample_keyframes, frame_batches
    from ipfacediff.injection import BatchedSource
    from ipfacediff.ddim import ddim_step
    from ipfacediff.pipeline import _cfg_eps
    c_edit, c_src = conds
    abar = self.c.scheduler.alphas_cumprod
    a_t, a_next = abar[t], (abar[t_next] if t_next >= 0 else abar[0])
    inj_a, inj_c = window
    src_of = lambda idx: BatchedSource(z_src[idx], c_src) if (inj_a or inj_c) else None
    kf_idx = sample_keyframes(len(z), cfg.batch_size, generator)
    _, kfs = ctl2.edit_keyframes(z[kf_idx], t, c_edit, kf_idx, source=src_of(kf_idx), attn=inj_a, conv=inj_c)
    new = torch.empty_like(z)
    for b in frame_batches(len(z), cfg.batch_size):
        eps = ctl2.propagate(z[b], t, c_edit, b, source=src_of(b), keyframes=kfs, attn=inj_a, conv=inj_c)
        new[b] = ddim_step(z[b], _cfg_eps(eps, cfg.guidance), a_t, a_next)
    return new

def test_keyframe_window_on_the_sample(tmp_path):
    from ipfacediff.pipeline import IPFaceDiffPipeline, EditConfig, unet_budget
    from ipfacediff.propagation import TokenFlowControl
    from ipfacediff.video import read_video
    from ipfacediff.faces import track_faces, align_faces
    torch.set_num_threads(1)
    frames, _ = read_video(data_path('sample.mp4'), progress=False)
    assert len(frames) == 40
    kw = dict(size=64, steps=3, inversion_steps=3)
    crops = align_faces(frames, track_faces(frames, size=64, progress=False), progress=False)
    pipe = IPFaceDiffPipeline.tiny(0, cache_dir=tmp_path, progress=False)
    traj, _ = pipe.invert(pipe.encode_crops(crops), EditConfig('x', **kw))
    ref = IPFaceDiffPipeline.tiny(0, progress=False)
    ref.edit_step = types.MethodType(_all_keyframes_step, ref)
    z_ref = ref.edit_latents(traj, EditConfig('add glasses', **kw))
    for w in (8, 5, None):   # 5 keyframes: any window ≥ 5 is one group — bit for bit the old step
        pipe.max_keyframe_group = 0
        assert torch.equal(pipe.edit_latents(traj, EditConfig('add glasses', keyframe_window=w, **kw)), z_ref), w
        assert pipe.max_keyframe_group == 5
    seen, orig = [], TokenFlowControl.edit_keyframes
    def spy(self, latents, *a, **k): seen.append(len(latents)); return orig(self, latents, *a, **k)
    pipe.calls.clear()
    with mock.patch.object(TokenFlowControl, 'edit_keyframes', spy):
        z2 = pipe.edit_latents(traj, EditConfig('add glasses', keyframe_window=2, **kw))
    assert max(seen) <= 2 and sum(seen) == 5 * 3 and torch.isfinite(z2).all() and not torch.equal(z2, z_ref)
    assert dict(pipe.calls) == {k: v for k, v in unet_budget(40, EditConfig('x', **kw), cached=True).items() if v}

def test_adapter_branches_share_forwards():
    from ipfacediff.bench import bench
    kw = dict(frames=[8], size=64, steps=2, inversion_steps=2, write=False, warmup=False, log=lambda *a: None)
    ad, sep = bench('tiny', branches='adapters', **kw), bench('tiny', branches='separate', **kw)
    assert ad['runs'][0]['budget_ok'] and sep['runs'][0]['budget_ok']
    assert ad['runs'][0]['unet_calls'] == sep['runs'][0]['unet_calls']
    assert ad['runs'][0]['unet_forwards'] < sep['runs'][0]['unet_forwards']

@pytest.mark.parametrize('args, msg', [(['--frames', '0'], 'at least 1'),
                                       (['--device', 'cuda'], 'no CUDA GPU'),
                                       (['--size', '100'], 'multiple of 64')])
def test_bad_input_exits_2(args, msg, capsys):
    if args[0] == '--device' and torch.cuda.is_available(): pytest.skip('a GPU is present')
    from ipfacediff.cli import main
    rc = main(['bench', *args])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.strip().count('\n') == 0
