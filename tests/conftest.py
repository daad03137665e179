import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


import pytest


@pytest.fixture(scope='module')
def clip_and_still(tmp_path_factory):
    "orig/clip.mp4 (16 frames, 320×180), a still distractor orig/still.png, and one method's edit ed/clip.mp4; root and frames."
    import cv2
    from shared import orig_and_edit
    root = tmp_path_factory.mktemp('clipstill')
    fr = orig_and_edit(root, 16, (320, 180))
    cv2.imwrite(str(root / 'orig' / 'still.png'), cv2.cvtColor(fr[3], cv2.COLOR_RGB2BGR))
    return root, fr


@pytest.fixture
def flows(monkeypatch):
    "Counts the optical flows `metrics` computes (each pair of the warp error asks for one; two with the occlusion mask)."
    from ipfacediff import metrics as M
    calls, real = [], M.compute_flow
    monkeypatch.setattr(M, 'compute_flow', lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture
def reads(monkeypatch):
    "The videos and stills `metrics` reads (each `media_frames` call is one read: a decoding pass, or more when streamed)."
    from ipfacediff import metrics as M
    calls, real = [], M.media_frames
    monkeypatch.setattr(M, 'media_frames', lambda p, *a, **k: calls.append(os.path.basename(p)) or real(p, *a, **k))
    return calls
