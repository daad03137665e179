"Helpers that several test files use: a two-person scene made from the sample clip, and the one-line `UserError` check."
import cv2, numpy as np, pytest
from pathlib import Path
from ipfacediff.utils import UserError

def two_faces(f, hide=False):
    "`f` on the left of a grey 1280×360 frame (face ~260 px), a 0.6× copy on the right (~155 px); `hide`: big face blurred."
    g = np.full((360, 1280, 3), 128, np.uint8); g[:, :640] = f
    g[72:288, 760:1144] = cv2.resize(f, (384, 216), interpolation=cv2.INTER_AREA)
    if hide: g[60:, 320:620] = cv2.GaussianBlur(g[60:, 320:620], (0, 0), 25)
    return g

def two_branches(n_frames: int, prompt: str) -> dict:
    "Tiny ε1 (seed 0) and ε2 (seed 1) UNets, the source and [negative | prompt] embeddings, and `n_frames` source and edit latents at 16²."
    import torch
    from ipfacediff.models import encode_prompt, tiny_components
    c1, c2 = tiny_components(0), tiny_components(1)
    g = torch.Generator().manual_seed(0)
    return dict(eps1=c1.unet, eps2=c2.unet, c_src=encode_prompt(c1, ''), c_cfg=encode_prompt(c1, ['', prompt]),
                z_src=torch.randn(n_frames, 4, 16, 16, generator=g), z=torch.randn(n_frames, 4, 16, 16, generator=g))

def one_line_error(f, *parts):
    "Call `f`; it must raise a one-line `UserError` containing every string in `parts`; return the message."
    with pytest.raises(UserError) as e: f()
    msg = str(e.value)
    assert '\n' not in msg and all(p in msg for p in parts), msg
    return msg

STREAM_SMOKE = dict(size=64, steps=2, inversion_steps=2, batch_size=3)   # streamed-edit tests: small, a batch boundary inside 8 frames

@pytest.fixture(scope='module', name='pipe')
def stream_pipe(tmp_path_factory):
    "The fixture `pipe` of a file that imports this: a tiny pipeline with its own cache, for its streamed and held edits."
    from ipfacediff.pipeline import IPFaceDiffPipeline
    return IPFaceDiffPipeline.tiny(0, cache_dir=tmp_path_factory.mktemp('cache'), progress=False)

def stream_and_hold(pipe, video, folder, sbs=True, ext='.mp4', **cfg):
    "The same edit streamed (s.mp4, s_sbs.mp4) and held in memory (m.mp4, m_sbs.mp4) in `folder`; their results."
    from ipfacediff.pipeline import EditConfig
    c = EditConfig('add glasses', **{**STREAM_SMOKE, **cfg})
    rs = pipe.edit(video, c, out=folder / f's{ext}', side_by_side=folder / f's_sbs{ext}' if sbs else None, stream=True)
    rm = pipe.edit(video, c, out=folder / f'm{ext}', side_by_side=folder / f'm_sbs{ext}' if sbs else None, stream=False)
    return rs, rm

def evaluate_report(folder) -> dict:
    "An `evaluate` report folder's files but the timings and the plots (matplotlib's pixels), by name: equal for equal evaluations."
    import json
    from pathlib import Path
    out = {}
    for p in sorted(Path(folder).rglob('*')):
        if p.is_dir() or p.suffix == '.png': continue
        t = p.read_text()
        if p.name == 'metrics.json':
            d = json.loads(t); d.pop('timing'); t = json.dumps(d, sort_keys=True)
        out[str(p.relative_to(folder))] = t
    return out

def evaluate_numbers(folder) -> dict:
    "`evaluate_report` without the counters that say how each number was obtained (cache reads, videos decoded)."
    import json
    r = evaluate_report(folder)
    d = json.loads(r['metrics.json'])
    for k in ('embeddings', 'warp_errors', 'decoding'): d.pop(k)
    return {**r, 'metrics.json': json.dumps(d, sort_keys=True)}

def orig_and_edit(root, n_frames: int, wh: tuple) -> np.ndarray:
    "`root`/orig/clip.mp4: the sample's first `n_frames` at `wh` (W, H), 10 fps; `root`/ed/clip.mp4: their colour-shifted copy. The frames."
    from ipfacediff.metrics import degrade
    from ipfacediff.utils import data_path
    from ipfacediff.video import read_video, write_video
    fr = read_video(data_path('sample.mp4'), max_frames=n_frames, progress=False)[0]
    fr = np.stack([cv2.resize(f, wh, interpolation=cv2.INTER_AREA) for f in fr])
    for d in ('orig', 'ed'): (root / d).mkdir()
    write_video(root / 'orig' / 'clip.mp4', fr, 10, progress=False)
    write_video(root / 'ed' / 'clip.mp4', degrade(fr, 'color', seed=1), 10, progress=False)
    return fr


def top_boxes(path):
    "The top-level box types of an ISO-BMFF (mp4/mov) file, in file order."
    data, i, out = Path(path).read_bytes(), 0, []
    while i + 8 <= len(data):
        size, kind = int.from_bytes(data[i:i + 4], 'big'), data[i + 4:i + 8].decode('latin-1')
        if size == 1: size = int.from_bytes(data[i + 8:i + 16], 'big')
        out.append(kind); i += size if size else len(data)
    return out
