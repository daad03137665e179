"`evaluate(cache_dir=...)` keeps the warp errors too: a second evaluation computes no optical flow and reports the same numbers."
import json, os
import numpy as np, pytest

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from ipfacediff import metrics as M
from ipfacediff.cli import main
from ipfacediff.video import write_video

from shared import evaluate_numbers


@pytest.fixture(scope='module')
def folders(clip_and_still): return clip_and_still


def test_second_evaluation_reads_the_warp_errors(folders, tmp_path, flows):
    root, fr = folders
    run = lambda out, **kw: M.evaluate(root / 'orig', root / 'ed', tmp_path / out, cache_dir=tmp_path / 'cache', progress=False, **kw)
    r1 = run('r1')
    assert r1['warp_errors'] == {'computed': 2, 'cached': 0} and len(flows) == 2 * 15     # the original and the edit; the still has no pair
    r2 = run('r2')
    assert r2['warp_errors'] == {'computed': 0, 'cached': 2} and len(flows) == 30
    assert r2['embeddings'] == {'computed': 0, 'cached': 3}
    assert evaluate_numbers(tmp_path / 'r2') == evaluate_numbers(tmp_path / 'r1')
    # the per-frame CSVs hold the per-pair errors, read back as they were written
    assert (tmp_path / 'r2' / 'per_video' / 'ed' / 'clip.csv').read_text() == (tmp_path / 'r1' / 'per_video' / 'ed' / 'clip.csv').read_text()
    # and without a cache the numbers are the same again
    r0 = M.evaluate(root / 'orig', root / 'ed', tmp_path / 'r0', progress=False)
    assert r0['warp_errors'] == {'computed': 2, 'cached': 0}
    assert evaluate_numbers(tmp_path / 'r0') == evaluate_numbers(tmp_path / 'r1')


def test_settings_and_content_are_part_of_the_key(folders, tmp_path, flows):
    root, fr = folders
    cache = tmp_path / 'cache'
    ev = lambda out, ed=root / 'ed', **kw: M.evaluate(root / 'orig', ed, tmp_path / out, cache_dir=cache, progress=False, **kw)
    ev('a')
    assert ev('b', flow='dis-fast')['warp_errors'] == {'computed': 2, 'cached': 0}          # another flow
    assert ev('c', occlusion_mask=True)['warp_errors'] == {'computed': 2, 'cached': 0}     # the mask
    assert ev('d', max_frames=10)['warp_errors'] == {'computed': 2, 'cached': 0}          # fewer frames
    # another edit under the same name: its own warp error is computed, the original's is read
    (tmp_path / 'ed2').mkdir()
    write_video(tmp_path / 'ed2' / 'clip.mp4', M.degrade(fr, 'blur'), 10, progress=False)
    r = ev('e', ed=tmp_path / 'ed2')
    assert r['warp_errors'] == {'computed': 1, 'cached': 1}
    assert r['methods']['ed2']['warp_error_original'] == ev('f')['methods']['ed']['warp_error_original']
    assert len(list(cache.glob('warp-*.npz'))) == 2 + 2 + 2 + 2 + 1


def test_a_damaged_cache_file_is_computed_again(folders, tmp_path, flows):
    root, _ = folders
    cache = tmp_path / 'cache'
    r1 = M.evaluate(root / 'orig', root / 'ed', tmp_path / 'r1', cache_dir=cache, progress=False)
    for f in cache.glob('warp-*.npz'): f.write_bytes(f.read_bytes()[:40])                  # cut short: unreadable
    r2 = M.evaluate(root / 'orig', root / 'ed', tmp_path / 'r2', cache_dir=cache, progress=False)
    assert r2['warp_errors'] == {'computed': 2, 'cached': 0}
    assert r2['methods']['ed']['warp_error'] == r1['methods']['ed']['warp_error']
    r3 = M.evaluate(root / 'orig', root / 'ed', tmp_path / 'r3', cache_dir=cache, progress=False)
    assert r3['warp_errors'] == {'computed': 0, 'cached': 2}                                 # rewritten whole


def test_cli_cache_dir(folders, tmp_path, flows, capsys):
    root, _ = folders
    args = ['evaluate', '--original', str(root / 'orig'), '--edited', str(root / 'ed'), '--cache-dir', str(tmp_path / 'c'), '--quiet']
    assert main(args + ['--out', str(tmp_path / 'o1')]) == 0 and len(flows) == 30
    assert main(args + ['--out', str(tmp_path / 'o2')]) == 0 and len(flows) == 30
    assert json.loads((tmp_path / 'o2' / 'metrics.json').read_text())['warp_errors'] == {'computed': 0, 'cached': 2}
    assert f"cache {tmp_path / 'c'}: face embeddings 3 read, 0 computed; warp errors 2 read, 0 computed" in capsys.readouterr().out


def test_embedding_cache_reads_the_settings_as_numbers(folders, tmp_path):
    "fps 10 (the API) and 10.0 (the CLI) are one key for the embeddings too, and NumPy numbers are keys, not a TypeError."
    root, _ = folders
    st, embs, v = M.EmbedStats(), M._parse_recognizers('dlib'), root / 'orig' / 'clip.mp4'
    a = M.embed_media(v, embs, tmp_path / 'c', fps=10, max_frames=np.int64(6), stats=st)
    b = M.embed_media(v, embs, tmp_path / 'c', fps=np.float32(10.0), max_frames=6, stats=st)
    assert (st.computed, st.cached) == (1, 1) and np.array_equal(a['dlib'].frames, b['dlib'].frames, equal_nan=True)


def test_raft_fingerprint_names_the_device_and_versions(tmp_path, monkeypatch):
    "RAFT on a GPU and on a CPU differ in the last bits: a cache shared by both machines keeps them apart (no torchvision here: stand-ins)."
    import sys, types, torch
    w = tmp_path / 'raft_large_C_T_SKHT_V2-ff5fadd5.pth'; w.write_bytes(b'w' * 10)
    monkeypatch.setattr(M, '_raft_weights', lambda: w)
    monkeypatch.setitem(sys.modules, 'torchvision', types.SimpleNamespace(__version__='0.28.0'))
    prints = {}
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda gpu=gpu: gpu)
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'NVIDIA H100 80GB HBM3')
        prints[gpu] = M.flow_fingerprint('raft')
    assert prints[False] != prints[True] and 'cuda NVIDIA H100' in prints[True] and 'torchvision 0.28.0' in prints[False]
    assert f'torch {torch.__version__}' in prints[False] and w.name in prints[False]
