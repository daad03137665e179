"""Invariants of the full-disk and out-of-memory handling that the other tests leave open: which checkpoint a failed
checkpoint names, no half checkpoint after an interruption, log.csv `seconds` after --resume, the memory check of
`bench`, `paste_back(out=)`'s dtype, the side-by-side video's error naming the user's file.

Real code paths with tiny models and a few frames; a full disk is `file_size_limit` (a write past it fails with EFBIG)."""
import csv, errno, warnings
from pathlib import Path
import numpy as np, pytest, torch

from ipfacediff.utils import UserError, data_path, file_size_limit
from ipfacediff.facedata import FaceDataset, demo_faces
from ipfacediff.finetune import FinetuneConfig, Finetuner, _checkpoints, read_log
from ipfacediff.losses import tiny_clip
from ipfacediff.models import tiny_components

SMALL = dict(tiny=True, size=64, batch_size=2, inversion_steps=10, t_max=201, rank=4, lr=2e-3, generic_p=0.0)

@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    folder, caps = demo_faces(tmp_path_factory.mktemp('faces'), size=96, n_video=3)
    return folder, caps, FaceDataset(folder, caps, size=64, quiet=True)

def _ft(faces, out, resume=False, **kw):
    "A tiny directional (ε2) LoRA fine-tuning run in `out`."
    folder, caps, ds = faces
    cfg = FinetuneConfig(mode='directional', data=str(folder), captions=str(caps), out=str(out), **{**SMALL, **kw})
    return Finetuner(cfg, comps=tiny_components(0), clip=tiny_clip(0), dataset=ds, resume=resume)

def _partials(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob('*.partial'))

def test_failed_checkpoint_names_the_newest_complete_one(faces, tmp_path):
    "Two complete checkpoints kept (step 1 and 2), step 3's write fails: the error offers step_000002 for --resume, not the older one."
    out = tmp_path / 'run'
    _ft(faces, out, steps=3, checkpoint_every=1, keep_checkpoints=3).train(stop_at=2, progress=False)
    assert [c.name for c in _checkpoints(out)] == ['step_000001', 'step_000002']
    ft = _ft(faces, out, resume=True, steps=3, checkpoint_every=1, keep_checkpoints=3)
    with file_size_limit(4), pytest.raises(OSError) as e: ft.train(progress=False)
    assert e.value.errno == errno.EFBIG and e.value.filename == str(out / 'checkpoints' / 'step_000003')
    assert 'the last complete one is step_000002, so free some space' in e.value.strerror, e.value.strerror
    assert [c.name for c in _checkpoints(out)] == ['step_000001', 'step_000002'] and _partials(out) == []

def test_checkpoint_interrupted_mid_write_leaves_no_partial(faces, tmp_path, monkeypatch):
    "Ctrl-C (or any error that is not a failed write) while the training state is saved: it goes on up, and no step_*.partial stays."
    out = tmp_path / 'run'
    ft = _ft(faces, out, steps=1, checkpoint_every=1)
    real_save = torch.save
    def interrupted(obj, f, *a, **k):          # torch.save writes part of the file, then the user presses Ctrl-C
        Path(f).write_bytes(b'half a training state')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', interrupted)
    with pytest.raises(KeyboardInterrupt): ft.train(progress=False)
    monkeypatch.setattr(torch, 'save', real_save)
    assert _partials(out) == [] and _checkpoints(out) == []
    assert not (out / 'checkpoints').exists() or list((out / 'checkpoints').iterdir()) == []

def test_finished_branch_is_not_torn_by_a_failed_publish(faces, tmp_path, monkeypatch):
    """A real full disk (ENOSPC: unlike a file-size limit, safetensors gets part of the file out) while the finished branch is saved
    again: the branch already in OUT stays whole (the new one goes to OUT/.branch.partial first), and nothing partial is left."""
    import hashlib, safetensors.torch
    out = tmp_path / 'run'
    ft = _ft(faces, out, steps=1, checkpoint_every=1)
    ft.train(progress=False)
    digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}
    before = digest()
    assert 'adapter_model.safetensors' in before
    real = safetensors.torch.save_file
    def disk_fills(tensors, filename, *a, **k):          # half the file reaches the disk, then ENOSPC
        real(tensors, filename, *a, **k)
        with open(filename, 'r+b') as fh: fh.truncate(Path(filename).stat().st_size // 2)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(safetensors.torch, 'save_file', disk_fills)
    with torch.no_grad():                                # the branch changed since: a torn write would show
        for p in ft.unwrapped.parameters():
            if p.requires_grad: p.add_(1.0)
    with pytest.raises(OSError, match='could not save the finished branch .*checkpoint step_000001 is complete') as e: ft.publish_branch()
    assert e.value.filename == str(out)
    monkeypatch.setattr(safetensors.torch, 'save_file', real)
    assert digest() == before and sorted(p.name for p in out.iterdir() if p.name.startswith('.')) == []

def _set_seconds(log: Path, seconds: dict):
    "Rewrite log.csv's `seconds` column for the given steps."
    rows = list(csv.DictReader(open(log, newline='')))
    for r in rows:
        if int(r['step']) in seconds: r['seconds'] = seconds[int(r['step'])]
    with open(log, 'w', newline='') as fh:
        w = csv.DictWriter(fh, list(rows[0])); w.writeheader(); w.writerows(rows)

def test_resumed_log_seconds_go_on_from_the_checkpoints_row(faces, tmp_path):
    "Killed after step 3 with the checkpoint at step 2: the resumed rows count on from step 2's seconds (the last kept row), not step 1's."
    out = tmp_path / 'run'
    _ft(faces, out, steps=4, checkpoint_every=2).train(stop_at=3, progress=False)
    _set_seconds(out / 'log.csv', {1: '100.0', 2: '1000.0', 3: '5000.0'})     # step 3 is past the checkpoint: dropped
    _ft(faces, out, resume=True, steps=4, checkpoint_every=2).train(progress=False)
    rows = read_log(out)
    assert [r['step'] for r in rows] == [1, 2, 3, 4]
    assert [r['seconds'] for r in rows[:2]] == [100.0, 1000.0]
    assert 1000 < rows[2]['seconds'] <= rows[3]['seconds'] < 1000 + 600, rows

def test_resume_with_a_blank_seconds_cell_starts_the_clock_at_zero(faces, tmp_path):
    "A log.csv row without seconds (edited by hand, or cut short) does not stop --resume: the clock starts again from 0."
    out = tmp_path / 'run'
    _ft(faces, out, steps=2, checkpoint_every=1).train(stop_at=1, progress=False)
    _set_seconds(out / 'log.csv', {1: ''})
    _ft(faces, out, resume=True, steps=2, checkpoint_every=1).train(progress=False)
    rows = list(csv.DictReader(open(out / 'log.csv', newline='')))
    assert [r['step'] for r in rows] == ['1', '2'] and rows[0]['seconds'] == '' and 0 <= float(rows[1]['seconds']) < 600, rows

def test_sample_frames_wants_three_times_the_frames_free(monkeypatch):
    "bench holds the frames, the edited copy and the crops: n frames are refused unless about 3× their bytes are free."
    import psutil
    from ipfacediff.bench import sample_frames
    from ipfacediff.video import read_video
    one = read_video(data_path('sample.mp4'), max_frames=1, progress=False)[0][0].nbytes
    n, real = 50, psutil.virtual_memory
    free = lambda b: monkeypatch.setattr(psutil, 'virtual_memory', lambda *a, **k: real()._replace(available=b))
    free(2 * n * one)
    with pytest.raises(UserError, match=f'--frames {n}: the edit would hold about .* give fewer --frames'): sample_frames(n)
    free(4 * n * one)
    f, fps = sample_frames(n)
    assert f.shape[0] == n and fps > 0

def test_bench_refuses_frames_before_building_the_models():
    "--frames that cannot be held is refused before the pipeline is built and measured (nothing logged, no models made)."
    from ipfacediff.bench import bench
    logged = []
    with pytest.raises(UserError, match='--frames 10000000: the edit would hold about'):
        bench('tiny', frames=(10**7,), size=64, steps=1, inversion_steps=1, warmup=False, write=False, log=logged.append)
    assert logged == []

@pytest.fixture(scope='module')
def tracked():
    from ipfacediff.video import read_video
    from ipfacediff.faces import track_faces, align_faces
    frames, _ = read_video(data_path('sample.mp4'), max_frames=3, progress=False)
    track = track_faces(frames, size=64, progress=False)
    return frames, align_faces(frames, track, progress=False), track

@pytest.mark.parametrize('dtype', [np.float32, np.uint16, np.int64])
def test_paste_back_out_must_be_uint8(tracked, dtype):
    from ipfacediff.faces import paste_back
    frames, crops, track = tracked
    with pytest.raises(ValueError, match='out must be uint8'):
        paste_back(frames, 255 - crops, track, progress=False, out=np.zeros(frames.shape, dtype))

def test_side_by_side_error_names_the_users_file(tmp_path):
    "The edited video fits, the (twice as wide) side-by-side does not: the error names sbs.mp4, not its hidden temporary; nothing is left."
    from ipfacediff.pipeline import IPFaceDiffPipeline, EditConfig
    from ipfacediff.video import read_video
    frames, info = read_video(data_path('sample.mp4'), max_frames=2, progress=False)
    pipe = IPFaceDiffPipeline.tiny(0, cache_dir=tmp_path / 'cache', progress=False)
    cfg = EditConfig('add glasses', size=64, steps=1, inversion_steps=1)
    probe = tmp_path / 'probe'; probe.mkdir()
    pipe.edit(frames, cfg, fps=info.fps, out=probe / 'o.mp4', side_by_side=probe / 's.mp4')
    small, big = (probe / 'o.mp4').stat().st_size, (probe / 's.mp4').stat().st_size
    assert big > small + 2048, (small, big)
    out = tmp_path / 'out'; out.mkdir()
    with warnings.catch_warnings(), file_size_limit((small + big) // 2 // 1024), pytest.raises(OSError) as e:
        warnings.simplefilter('ignore')
        pipe.edit(frames, cfg, fps=info.fps, out=out / 'o.mp4', side_by_side=out / 's.mp4')
    assert e.value.errno == errno.EFBIG and e.value.filename == str(out / 's.mp4'), (e.value.errno, e.value.filename)
    assert list(out.iterdir()) == []                                   # both files together, or neither
