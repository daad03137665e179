"""Fine-tuning ε1/ε2 (ipfacediff.finetune): exact resume after a kill, LoRA round trip, CLI errors.

Tiny random SD components + real face crops on CPU; the whole file runs in well under 90 s on 2 cores."""
import os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file

os.environ.setdefault('HF_HUB_OFFLINE', '1')
from ipfacediff.facedata import FaceDataset, demo_faces
from ipfacediff.finetune import FinetuneConfig, Finetuner, _checkpoints, config_from_args, read_log
from ipfacediff.models import load_branch, tiny_components
from ipfacediff.cli import build_parser, main
from ipfacediff.utils import UserError

SMALL = dict(tiny=True, size=64, batch_size=2, inversion_steps=10, t_max=201, rank=4, lr=2e-3)

@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    folder, caps = demo_faces(tmp_path_factory.mktemp('faces'), size=96, n_video=3)
    return folder, caps, FaceDataset(folder, caps, size=64, quiet=True)

@pytest.fixture(scope='module')
def f_arc():
    import ipfacediff.embedders  # noqa: F401  (part of the package: a broken install fails here, it is not skipped)
    from ipfacediff.finetune import get_f_arc
    return get_f_arc('dlib')

def _ft(faces, out, f_arc=None, resume=False, **kw):
    folder, caps, ds = faces
    cfg = FinetuneConfig(data=str(folder), captions=str(caps), out=str(out), **{**SMALL, **kw})
    return Finetuner(cfg, comps=tiny_components(0), f_arc=f_arc, dataset=ds, resume=resume)

def test_resume_in_the_other_mode_says_so(faces, f_arc, tmp_path):
    _ft(faces, tmp_path / 'r', f_arc, mode='identity', steps=1, checkpoint_every=1).train(progress=False)
    with pytest.raises(UserError, match=r"is of a fine-tuning run \(identity\): resume it with `ipfacediff finetune identity"):
        _ft(faces, tmp_path / 'r', mode='directional', steps=2, resume=True)

def test_lora_resume_is_exact(faces, f_arc, tmp_path):
    "ε1 with LoRA, sampled t, DDIM inversion, gradient accumulation: straight 5 steps == 3 steps + kill + resume."
    kw = dict(mode='identity', steps=5, grad_accum=2, checkpoint_every=3)
    a = _ft(faces, tmp_path / 'a', f_arc, **kw); a.train(progress=False)
    b = _ft(faces, tmp_path / 'b', f_arc, **kw); b.train(stop_at=4, progress=False)     # killed after step 4, last checkpoint 3
    assert [c.name for c in _checkpoints(tmp_path / 'b')] == ['step_000003']
    b = _ft(faces, tmp_path / 'b', f_arc, resume=True, **kw)
    assert b.step == 3
    b.train(progress=False)
    sa, sb = a.unwrapped.state_dict(), b.unwrapped.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    la, lb = read_log(tmp_path / 'a'), read_log(tmp_path / 'b')
    assert [r['step'] for r in lb] == [1, 2, 3, 4, 5] and [r['loss'] for r in la] == [r['loss'] for r in lb]
    # the saved adapters are bitwise equal too, and they changed the UNet
    wa, wb = load_file(str(tmp_path / 'a' / 'adapter_model.safetensors')), load_file(str(tmp_path / 'b' / 'adapter_model.safetensors'))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(v.abs().max() > 0 for k, v in wa.items() if 'lora_B' in k)

def test_lora_adapter_reloads_with_same_outputs(faces, tmp_path):
    ft = _ft(faces, tmp_path / 'e2', mode='directional', steps=3, fixed_t=101)
    ft.train(progress=False)
    base = tiny_components(0).unet
    eps2 = load_branch(tmp_path / 'e2', base, 'ε2')
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([101, 601]), torch.randn(2, 77, 32)
    with torch.no_grad():
        want = ft.unwrapped(x, t, encoder_hidden_states=c).sample
        got = eps2(x, t, encoder_hidden_states=c).sample
        plain = base(x, t, encoder_hidden_states=c).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-5

def test_cli_bad_input_is_one_line_exit_2(faces, tmp_path, capsys):
    folder, caps, _ = faces
    assert main(['finetune', 'identity', '--data', str(tmp_path / 'missing'), '--out', str(tmp_path / 'o'), '--tiny']) == 2
    err = capsys.readouterr().err
    assert err.startswith('ipfacediff: error:') and err.count('\n') == 1 and 'does not exist' in err
    (tmp_path / 'bad.jsonl').write_text('{"image": "nope.png", "caption": "x"}\n')
    assert main(['finetune', 'directional', '--data', str(folder), '--captions', str(tmp_path / 'bad.jsonl'), '--out', str(tmp_path / 'o'), '--tiny']) == 2
    assert 'matches none' in capsys.readouterr().err
    assert main(['finetune', 'identity', '--data', str(folder), '--out', str(tmp_path / 'o'), '--tiny', '--size', '60']) == 2
    assert 'multiple of 8' in capsys.readouterr().err
    (tmp_path / 'latin1.jsonl').write_bytes(b'{"image": "000.png", "caption": "caf\xe9 man"}\n')
    assert main(['finetune', 'directional', '--data', str(folder), '--captions', str(tmp_path / 'latin1.jsonl'), '--out', str(tmp_path / 'o'), '--tiny']) == 2
    assert 'is not UTF-8 text' in capsys.readouterr().err
    (tmp_path / 'afile').write_text('x')
    assert main(['finetune', 'identity', '--data', str(folder), '--out', str(tmp_path / 'afile' / 'run'), '--tiny']) == 2
    assert 'afile is a file, not a folder' in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()

def test_cli_killed_process_resumes_exactly(faces, tmp_path):
    "A real `ipfacediff finetune` process killed with SIGKILL after a checkpoint, resumed with --resume, ends where a straight run ends."
    folder, caps, _ = faces
    args = ['finetune', 'directional', '--data', str(folder), '--captions', str(caps), '--tiny', '--size', '64', '--batch-size', '2',
            '--inversion-steps', '10', '--t-max', '201', '--rank', '4', '--lr', '2e-3', '--steps', '8', '--checkpoint-every', '2', '--no-progress']
    cmd = [sys.executable, '-c', 'import sys; from ipfacediff.cli import main; sys.exit(main(sys.argv[1:]))']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    straight = subprocess.run(cmd + args + ['--out', str(tmp_path / 'straight')], env=env, capture_output=True, text=True, timeout=120)
    assert straight.returncode == 0, straight.stderr[-2000:]
    p = subprocess.Popen(cmd + args + ['--out', str(tmp_path / 'killed')], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not _checkpoints(tmp_path / 'killed') and p.poll() is None and time.time() - t0 < 60: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    done = _checkpoints(tmp_path / 'killed')
    assert done and int(done[-1].name[5:]) < 8, 'the run finished before it could be killed'
    resumed = subprocess.run(cmd + args + ['--out', str(tmp_path / 'killed'), '--resume'], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    wa = load_file(str(tmp_path / 'straight' / 'adapter_model.safetensors'))
    wb = load_file(str(tmp_path / 'killed' / 'adapter_model.safetensors'))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r['loss'] for r in read_log(tmp_path / 'straight')] == [r['loss'] for r in read_log(tmp_path / 'killed')]

def test_lora_init_follows_the_seed(faces, tmp_path):
    "The adapters' initial weights depend on cfg.seed only, not on what the global RNG drew before; the caller's RNG is left alone."
    folder, caps, ds = faces
    comps = [tiny_components(0) for _ in range(3)]        # tiny_components seeds the global RNG itself: built before the draws
    cfg = lambda out, seed: FinetuneConfig(mode='identity', data=str(folder), out=str(tmp_path / out), **{**SMALL, 'seed': seed})
    lora_a = lambda ft: {k: v.clone() for k, v in ft.unwrapped.state_dict().items() if 'lora_A' in k}
    torch.randn(3); state = torch.get_rng_state()
    a = lora_a(Finetuner(cfg('a', 5), comps=comps[0], f_arc=torch.nn.Identity(), dataset=ds))
    assert torch.equal(torch.get_rng_state(), state)
    torch.randn(11)
    b = lora_a(Finetuner(cfg('b', 5), comps=comps[1], f_arc=torch.nn.Identity(), dataset=ds))
    c = lora_a(Finetuner(cfg('c', 6), comps=comps[2], f_arc=torch.nn.Identity(), dataset=ds))
    assert a and a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)

def _settings(*args):
    return config_from_args(build_parser(['finetune']).parse_args(['finetune', 'identity', '--data', 'd', '--out', 'o', *args]))

def test_tiny_lowers_unset_defaults():
    "`finetune --tiny` is a smoke run: the options not given get small values; given ones are kept."
    c = _settings('--tiny')
    assert (c.steps, c.batch_size, c.size, c.inversion_steps, c.rank) == (4, 2, 64, 10, 4) and c.tiny
    c = _settings('--tiny', '--steps', '6', '--batch-size', '3')           # what the user gives wins
    assert (c.steps, c.batch_size, c.size) == (6, 3, 64)
    c = _settings()                                                        # the paper's defaults without --tiny
    assert (c.steps, c.batch_size, c.size, c.inversion_steps, c.rank, c.checkpoint_every) == (30_000, 16, 512, 50, 16, 1000)

def test_tiny_is_announced(capsys):
    with pytest.raises(SystemExit): main(['finetune', '--help'])
    help = ' '.join(capsys.readouterr().out.split())
    assert 'smoke run' in help and '--steps 4 --batch-size 2 --size 64' in help and 'default 30000; 4 with --tiny' in help

@pytest.mark.parametrize('bad,msg', [(['--num-workers', '-1'], '--num-workers must be 0 or more'), (['--steps', '0'], '--steps must be at least 1'),
    (['--batch-size', '0'], '--batch-size'), (['--lr', '0'], '--lr must be a positive'), (['--lr', 'nan'], '--lr'), (['--size', '0'], '--size'),
    (['--rank', '0'], '--rank'), (['--lambda2', '-0.5'], '--lambda2'), (['--t-min', '600', '--t-max', '500'], '--t-min'),
    (['--fixed-t', '400'], '--fixed-t 400'), (['--gen-steps', '0'], '--gen-steps'), (['--inversion-steps', '1000'], '--inversion-steps'),
    (['--warmup-steps', '-2'], '--warmup-steps'), (['--keep-checkpoints', '0'], '--keep-checkpoints'), (['--device', 'tpu'], 'tpu'),
    (['--full', '--rank', '8'], 'has no LoRA rank: drop --rank')])
def test_cli_bad_numbers_fail_before_writing(faces, tmp_path, capsys, bad, msg):
    folder, caps, _ = faces
    out = tmp_path / 'run'
    assert main(['finetune', 'directional', '--data', str(folder), '--captions', str(caps), '--out', str(out), '--tiny', *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith('ipfacediff: error:') and err.count('\n') == 1 and msg in err, err
    assert not out.exists()

def test_run_stopped_before_first_checkpoint_does_not_block(faces, tmp_path):
    "A folder with only config.json / log.csv (a run that died before its first checkpoint) is started again; anything else still blocks."
    out = tmp_path / 'u'
    _ft(faces, out, mode='directional', steps=2)                        # built, never trained: config.json only
    (out / 'log.csv').write_text('step,loss,part1,part2,t,lr,seconds\n1,0.5,0.3,0.2,101,0.002,1.0\n')
    ft = _ft(faces, out, mode='directional', steps=2)                   # no --resume, no --overwrite
    assert sorted(p.name for p in out.iterdir()) == ['config.json'] and ft.step == 0
    assert _ft(faces, out, mode='directional', steps=2, resume=True).resume_from is None
    ft.train(progress=False)                                            # finished: a checkpoint and the adapter
    with pytest.raises(UserError, match='is not empty: pass --resume'): _ft(faces, out, mode='directional', steps=2)
    user = tmp_path / 'mine'; user.mkdir(); (user / 'config.json').write_text('{}'); (user / 'notes.txt').write_text('x')
    with pytest.raises(UserError, match='is not empty'): _ft(faces, user, mode='directional', steps=2)

def test_cli_overwrite_deletes_nothing_on_bad_input(faces, tmp_path, capsys):
    folder, caps, _ = faces
    out = tmp_path / 'done'
    _ft(faces, out, mode='directional', steps=1).train(progress=False)
    before = sorted(p.name for p in out.iterdir())
    for bad in (['--device', 'tpu'], ['--data', str(tmp_path / 'missing')], ['--steps', '0']):
        args = ['finetune', 'directional', '--data', str(folder), '--captions', str(caps), '--out', str(out), '--tiny', '--overwrite', *bad]
        assert main(args) == 2, bad
        assert capsys.readouterr().err.count('\n') == 1
        assert sorted(p.name for p in out.iterdir()) == before, bad

def test_tiny_branches_drive_a_tiny_edit(faces, f_arc, tmp_path, capsys, monkeypatch):
    "The README's workflow offline: ε1 (eq. 5) and ε2 (eq. 6) fine-tuned on the tiny models, then `edit --tiny` with both."
    from ipfacediff.pipeline import IPFaceDiffPipeline
    from ipfacediff.utils import data_path
    for mode in ('identity', 'directional'):
        _ft(faces, tmp_path / mode, f_arc if mode == 'identity' else None, mode=mode, steps=2).train(progress=False)
    pipe = IPFaceDiffPipeline.tiny(0, tmp_path / 'identity', tmp_path / 'directional', progress=False)
    assert pipe.adapters is not None and pipe.shared       # two LoRA adapters of one UNet, one forward for both
    monkeypatch.setenv('IPFACEDIFF_CACHE', str(tmp_path / 'cache'))
    run = ['edit', str(data_path('sample.mp4')), '--prompt', 'add glasses', '--tiny', '--max-frames', '4', '--steps', '2', '--quiet']
    assert main([*run, '--out', str(tmp_path / 'base.mp4')]) == 0
    capsys.readouterr()
    assert main([*run, '--out', str(tmp_path / 'ft.mp4'), '--identity-model', str(tmp_path / 'identity'),
                 '--edit-model', str(tmp_path / 'directional')]) == 0
    out = capsys.readouterr().out
    assert 'inversion: computed' in out, out                 # another ε1: the base model's inversion is not reused
    assert (tmp_path / 'ft.mp4').read_bytes() != (tmp_path / 'base.mp4').read_bytes()
    # branches of other tiny models, or of SD 2.1, are refused before any work
    import json, shutil
    for name, change, msg in (('seed1', {'seed': 1}, 'different tiny models (--seed 0 and 1)'), ('sd', {'tiny': False}, 'not with --tiny')):
        shutil.copytree(tmp_path / 'directional', tmp_path / name)
        c = json.loads((tmp_path / name / 'config.json').read_text()); c.update(change)
        (tmp_path / name / 'config.json').write_text(json.dumps(c))
        assert main([*run, '--out', str(tmp_path / f'{name}.mp4'), '--identity-model', str(tmp_path / 'identity'), '--edit-model', str(tmp_path / name)]) == 2
        assert msg in capsys.readouterr().err and not (tmp_path / f'{name}.mp4').exists()
    # a run stopped before its final save: one line pointing to --resume and to its checkpoint, which itself drives the edit
    unf = tmp_path / 'unfinished'; ck = unf / 'checkpoints' / 'step_000002'; ck.mkdir(parents=True)
    shutil.copy(tmp_path / 'identity' / 'config.json', unf / 'config.json')
    for f in ('adapter_config.json', 'adapter_model.safetensors'): shutil.copy(tmp_path / 'identity' / f, ck / f)
    assert main([*run, '--out', str(tmp_path / 'u.mp4'), '--identity-model', str(unf)]) == 2
    assert f'--resume` and its other options, or pass its checkpoint {ck}' in capsys.readouterr().err
    assert main([*run, '--out', str(tmp_path / 'ck.mp4'), '--identity-model', str(ck)]) == 0

def test_cli_full_disk_is_one_line_and_leaves_no_half_checkpoint(faces, tmp_path):
    "`ipfacediff finetune` under a 4 KiB file-size limit (a full disk): exit 1, one line naming the checkpoint, no step_*.partial."
    import resource
    folder, caps, _ = faces
    out = tmp_path / 'run'
    args = ['finetune', 'identity', '--data', str(folder), '--captions', str(caps), '--tiny', '--size', '64', '--steps', '2',
            '--checkpoint-every', '1', '--inversion-steps', '10', '--t-max', '201', '--out', str(out), '--no-progress']
    cmd = [sys.executable, '-c', 'import sys; from ipfacediff.cli import main; sys.exit(main(sys.argv[1:]))']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    full = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    r = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=120, preexec_fn=full)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert err[-1] == (f'ipfacediff: error: could not write the checkpoint of step 1 (File too large); nothing of it is kept: '
                       f'free some space, then run the same command again: {out / "checkpoints" / "step_000001"}'), err
    assert sorted(p.name for p in out.rglob('*')) == ['checkpoints', 'config.json', 'log.csv']
    r = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=120)   # space freed: the same command runs
    assert r.returncode == 0, r.stderr[-2000:]
    assert [c.name for c in _checkpoints(out)] == ['step_000001', 'step_000002'] and (out / 'adapter_model.safetensors').exists()

def test_tensorboard_gets_every_step(faces, f_arc, tmp_path):
    "--tensorboard: loss, both parts and the learning rate of every step in OUT/tensorboard, read back with tensorboard's own reader."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ft = _ft(faces, tmp_path / 'tb', f_arc, mode='identity', steps=3, checkpoint_every=10, tensorboard=True)
    rows = ft.train(progress=False)
    ea = EventAccumulator(str(tmp_path / 'tb' / 'tensorboard')); ea.Reload()
    assert sorted(ea.Tags()['scalars']) == ['loss', 'lr', 'part1', 'part2']
    got = [(e.step, e.value) for e in ea.Scalars('loss')]
    assert [s for s, _ in got] == [1, 2, 3] and all(abs(v - r['loss']) < 1e-6 for (_, v), r in zip(got, rows))
