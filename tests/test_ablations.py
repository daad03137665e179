"""`ipfacediff ablations` end to end (issue 6, part 4): the §5.6 configurations on a few frames of the bundled
sample with tiny random models and branches fine-tuned on the spot — one mp4 per configuration with the right
frame count, the tables, metrics and the frame grid; bad input refused with exit code 2 and nothing written;
an existing study not overwritten without --overwrite."""
import json, os, shutil, subprocess, sys, time
from pathlib import Path
import pytest
from ipfacediff.utils import data_path

from cli_helpers import run_cli, run_inprocess

SAMPLE = str(data_path('sample.mp4'))
ROWS = ['base', 'base_inject', 'ft_eps2', 'ft_eps1_inject', 'full', 'full_no_inject']

def cli(*args, cache):
    "`ipfacediff ablations ARGS --quiet` in a subprocess; (result, seconds)."
    return run_cli('ablations', *args, '--quiet', cache=cache, env={'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'MPLBACKEND': 'Agg'})

def inprocess(capsys, monkeypatch, *args, cache):
    "The same command in this process: exit code, stdout, stderr."
    r = run_inprocess(capsys, monkeypatch, 'ablations', *args, '--quiet', cache=cache)
    return r.returncode, r.stdout, r.stderr

@pytest.fixture(scope='module')
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp('ablations')
    r, secs = cli(SAMPLE, '--prompt', 'add glasses', '--out', str(d / 'study'), '--tiny', '--max-frames', '6', '--steps', '4',
                  '--grid-frames', '4', cache=d / 'cache')
    assert r.returncode == 0, r.stderr[-3000:]
    return d, r, secs

def test_tiny_study_end_to_end(study):
    from ipfacediff.video import read_video
    d, r, secs = study
    out = d / 'study'
    print(f'ipfacediff ablations --tiny: {secs:.0f} s')
    assert 'smoke run' in r.stdout and 'wrote' in r.stdout
    assert 'Loading weights' not in r.stderr and 'Writing model shards' not in r.stderr   # --quiet: the libraries' bars too
    for n in ROWS:                                   # one edit per configuration, named like the original
        frames, info = read_video(out / n / 'sample.mp4', progress=False)
        assert len(frames) == 6 and info.fps == 10.0
    assert (out / 'grid.png').stat().st_size > 10_000
    table = (out / 'ablations.md').read_text()
    assert [l.split('|')[1].strip() for l in table.splitlines() if l.startswith('| ') and '---' not in l][1:] == ROWS
    assert 'Smoke run' in table and table in r.stdout
    j = json.loads((out / 'ablations.json').read_text())
    metrics = json.loads((out / 'metrics' / 'metrics.json').read_text())
    assert j['smoke'] is True and list(j['rows']) == ROWS
    for n, row in j['rows'].items():
        # with or without injection the ε1 source pass runs in the window: it gives the NN field of the propagation
        assert row['unet_calls']['source'] == j['rows']['full']['unet_calls']['source'] > 0, n
        assert row['crop_metrics']['cosine_distance'] is not None and row['crop_metrics']['cosine_distance'] > 0
        # evaluate scored every row; an edit in which dlib finds no face (the noise of a smoke run) is a miss, not a crash
        v = metrics['methods'][n]['videos']['sample']
        assert row['evaluate_no_face'] is (not v['face_found']), n
        assert v['face_found'] or v['identity']['dlib']['rank'] is None, n
    lost = [n for n, row in j['rows'].items() if row['evaluate_no_face']]
    if lost:                                         # one summary line, not one warning per row
        assert f"no face found in the edits of {', '.join(lost)}" in r.stdout
        assert 'edited frames: a miss' not in r.stderr
    # the fine-tuned branches were made on the spot and kept, and the recorded commands point at them
    assert (out / 'tiny' / 'eps1' / 'adapter_config.json').exists() and (out / 'tiny' / 'eps2' / 'adapter_config.json').exists()
    umask = os.umask(0); os.umask(umask)                  # the copied tiny assets have the user's usual modes, not mkdtemp's 0700
    for q in [out / 'tiny', *(out / 'tiny').rglob('*')]:
        assert q.stat().st_mode & 0o777 == (0o777 if q.is_dir() else 0o666) & ~umask, (q, oct(q.stat().st_mode))
    assert f"--edit-model {out / 'tiny' / 'eps2'}" in j['rows']['full']['command']
    assert '--identity-model' not in j['rows']['ft_eps2']['command'] and '--no-identity-injection' in j['rows']['ft_eps2']['command']
    assert not [p for p in d.iterdir() if p.name.startswith('.')]   # no temporary folders left behind

def test_refuses_to_overwrite(study, capsys, monkeypatch):
    d, _, _ = study
    out = d / 'study'
    before = {p: p.stat().st_mtime_ns for p in out.rglob('*')}
    rc, o, e = inprocess(capsys, monkeypatch, SAMPLE, '--prompt', 'add glasses', '--out', str(out), '--tiny', '--max-frames', '6', cache=d / 'cache')
    assert rc == 2 and 'already exists' in e and '--overwrite' in e and e.count('\n') == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*')} == before

@pytest.mark.parametrize('args, msg', [
    (['/nonexistent/clip.mp4', '--tiny'], 'does not exist'),
    ([SAMPLE, '--tiny', '--size', '100'], 'multiple of 64'),
    ([SAMPLE, '--tiny', '--configs', 'base,bogus'], "unknown configuration 'bogus'"),
    ([SAMPLE, '--identity-model', '/nonexistent/eps1'], 'pass --edit-model PATH'),          # ft_eps2 needs ε2
    ([SAMPLE, '--configs', 'ft_eps1_inject', '--edit-model', 'x'], 'pass --identity-model PATH'),
    ([SAMPLE, '--configs', 'base,ft_eps2', '--edit-model', 'runs/eps2_typo'], 'could not load --edit-model runs/eps2_typo'),  # before `base` runs
])
def test_bad_input_exit_2_nothing_written(tmp_path, capsys, monkeypatch, args, msg):
    out = tmp_path / 'study'
    rc, o, e = inprocess(capsys, monkeypatch, args[0], '--prompt', 'add glasses', '--out', str(out), *args[1:], cache=tmp_path / 'cache')
    assert rc == 2, (o, e)
    assert msg in e and e.count('\n') == 1 and 'Traceback' not in e
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ['cache']) and not out.exists()

@pytest.mark.parametrize('args, msg', [
    ([str(Path(SAMPLE).parent), '--tiny'], 'is a folder: give one video file'),
    ([SAMPLE, '--tiny', '--grid-frames', '0'], '--grid-frames must be at least 1'),
    ([SAMPLE, '--tiny', '--recognizers', 'foo'], "unknown face embedder 'foo'"),
    ([SAMPLE, '--tiny', '--gallery', '/nonexistent/gallery'], 'no such folder: /nonexistent/gallery'),
])
def test_tiny_checks_before_fine_tuning(tmp_path, capsys, monkeypatch, args, msg):
    "A --tiny study fine-tunes its branches first: every check that needs no branch comes before that work."
    import ipfacediff.ablations as A
    tuned = []
    monkeypatch.setattr(A, 'tiny_branches', lambda *a, **k: tuned.append(1) or (_ for _ in ()).throw(RuntimeError('fine-tuned')))
    out = tmp_path / 'study'
    rc, o, e = inprocess(capsys, monkeypatch, args[0], '--prompt', 'add glasses', '--out', str(out), *args[1:], cache=tmp_path / 'cache')
    assert rc == 2 and msg in e and e.count('\n') == 1, (o, e)
    assert not tuned and not out.exists()

def test_never_replaces_a_folder_holding_the_input(tmp_path, capsys, monkeypatch):
    "--overwrite replaces an earlier study, but not one that holds the input video: that would delete it."
    out = tmp_path / 'study'; out.mkdir()
    (out / 'ablations.json').write_text('{}'); shutil.copy(SAMPLE, out / 'clip.mp4')
    rc, o, e = inprocess(capsys, monkeypatch, str(out / 'clip.mp4'), '--prompt', 'add glasses', '--out', str(out), '--tiny', '--overwrite',
                         cache=tmp_path / 'cache')
    assert rc == 2 and 'holds the input' in e and e.count('\n') == 1, e
    assert sorted(p.name for p in out.iterdir()) == ['ablations.json', 'clip.mp4']

def test_never_replaces_a_folder_holding_the_branches(tmp_path, capsys, monkeypatch):
    "The fine-tuned branches are inputs too: an earlier study's folder that holds them is not replaced (before any model loads)."
    out = tmp_path / 'study'; out.mkdir()
    (out / 'ablations.json').write_text('{}')
    for b in ('eps1', 'eps2'): (out / b).mkdir(); (out / b / 'adapter_config.json').write_text('{}')
    rc, o, e = inprocess(capsys, monkeypatch, SAMPLE, '--prompt', 'add glasses', '--out', str(out), '--overwrite',
                         '--identity-model', str(out / 'eps1'), '--edit-model', str(out / 'eps2'), cache=tmp_path / 'cache')
    assert rc == 2 and 'holds the input' in e and 'eps1' in e and e.count('\n') == 1, e
    assert sorted(p.name for p in out.iterdir()) == ['ablations.json', 'eps1', 'eps2']
