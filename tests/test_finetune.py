"""Fine-tuning ε1/ε2 (ipfacediff.finetune): exact resume after a kill, LoRA round trip, CLI errors.

Tiny random SD components + real face crops on CPU; the whole file runs in well under 90 s on 2 cores."""
import os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file

os.environ.setdefault('HF_HUB_OFFLINE', '1')
from ipfacediff.facedata import FaceDataset, demo_faces
from ipfacediff.finetune import FinetuneConfig, Finetuner, _checkpoints, read_log
from ipfacediff.models import load_branch, tiny_components
from ipfacediff.cli import main

SMALL = dict(tiny=True, size=64, batch_size=2, inversion_steps=10, t_max=201, rank=4, lr=2e-3)

@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    folder, caps = demo_faces(tmp_path_factory.mktemp('faces'), size=96, n_video=3)
    return folder, caps, FaceDataset(folder, caps, size=64, quiet=True)

@pytest.fixture(scope='module')
def f_arc():
    pytest.importorskip('ipfacediff.embedders')
    from ipfacediff.finetune import get_f_arc
    return get_f_arc('dlib')

def _ft(faces, out, f_arc=None, resume=False, **kw):
    folder, caps, ds = faces
    cfg = FinetuneConfig(data=str(folder), captions=str(caps), out=str(out), **{**SMALL, **kw})
    return Finetuner(cfg, comps=tiny_components(0), f_arc=f_arc, dataset=ds, resume=resume)

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
