"""Mutation review of `ipfacediff.ablations` (§5.6): behaviour that the notebook, tests/test_ablations.py and
tests/test_bench_ablations_data_cli_invariants.py let through. What these tests pin: `ipfacediff ablations` without --steps edits with 50 steps (the paper's,
as `ipfacediff edit`); the recorded `ipfacediff evaluate` command keeps --fps, --max-frames and --recognizers; the frame
grid's first row is the source crops (not an edit) and every other row is that row's edit; the ablation table puts each
number in its own column (ε1/ε2, crop cos. distance vs mean per-frame distance, TL-ID vs TG-ID, evaluate's distance
and warp error vs the crops' ones) and shows NaN as '—', and R@1/MRR only when ranked against a gallery; a grid of rows of unequal length spans the shortest;
`crop_metrics` with no crop marked used is a one-line error. Tiny random models, data/sample.mp4, CPU, offline."""
import contextlib, io, shlex, warnings
import numpy as np, pytest, torch
from ipfacediff.utils import data_path
from shared import one_line_error

SAMPLE = str(data_path('sample.mp4'))


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    """`ipfacediff ablations` (its `run_cli`, not --tiny) on a tiny model folder: row base, 2 frames at 64², no --steps,
    --fps 5, --recognizers 'dlib, dlib'; the rows `frame_grid` was given are recorded (the real function draws the grid)."""
    import ipfacediff.ablations as A
    from ipfacediff.cli import build_parser
    from ipfacediff.models import save_components, tiny_components
    d = tmp_path_factory.mktemp('study')
    model = save_components(tiny_components(0), d / 'model')
    argv = ['ablations', SAMPLE, '--prompt', 'add glasses', '--out', str(d / 'study'), '--model', str(model), '--configs', 'base',
            '--size', '64', '--max-frames', '2', '--fps', '5', '--recognizers', 'dlib, dlib', '--grid-frames', '2',
            '--device', 'cpu', '--dtype', 'float32', '--cache-dir', str(d / 'cache'), '--quiet']
    a = build_parser(argv).parse_args(argv)
    drawn, real = [], A.frame_grid
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter('ignore')
            mp.setattr(A, 'frame_grid', lambda rows, *args, **kw: drawn.append(rows) or real(rows, *args, **kw))
            res = A.run_cli(a)
    finally: torch.set_num_threads(n)
    return res, drawn


def test_study_without_steps_edits_with_50(study):
    "No --steps (and no --tiny): 50 DDIM steps, the paper's and `ipfacediff edit`'s, and the inversion on the same grid."
    res, _ = study
    import json
    s = json.loads((res.out / 'ablations.json').read_text())['settings']
    assert (s['steps'], s['inversion_steps']) == (50, 50)
    assert '--steps 50 --inversion-steps 50' in res.rows['base']['command']


def test_study_evaluate_command_keeps_fps_frames_and_recognizers(study):
    "The recorded `ipfacediff evaluate` command scores what the study scored: same --fps, --max-frames and --recognizers."
    import json
    from ipfacediff.cli import build_parser
    res, _ = study
    argv = shlex.split(json.loads((res.out / 'ablations.json').read_text())['evaluate_command'])
    assert argv[:2] == ['ipfacediff', 'evaluate']
    e = build_parser(argv[1:]).parse_args(argv[1:])
    assert (e.fps, e.max_frames, e.recognizers) == (5.0, 2, 'dlib, dlib'), argv
    assert e.edited == [str(res.out / 'base')] and e.out == str(res.out / 'metrics')


def test_study_grid_rows_are_source_then_each_edit(study):
    "grid.png's first row ('original') is the source crops the rows edited; each other row is that row's own edited crops."
    res, drawn = study
    assert len(drawn) == 1 and list(drawn[0]) == ['original', 'base']
    r = res.edits['base']
    assert np.array_equal(drawn[0]['original'], r.source_crops) and np.array_equal(drawn[0]['base'], r.crops)
    assert not np.array_equal(r.crops, r.source_crops)
    assert res.grid.exists() and res.grid.stat().st_size > 1000


def _cells(table, name):
    line = [l for l in table.splitlines() if l.startswith(f'| {name} |')]
    assert len(line) == 1, table
    return [c.strip() for c in line[0].strip('|').split('|')]

def test_table_puts_each_number_in_its_column():
    "Each value of a row's record and of evaluate's metrics lands under its own header (distinct values, so a swap shows); NaN → '—'."
    from ipfacediff.ablations import _table, ABLATIONS
    a = ABLATIONS['ft_eps1_inject']                                  # ε1 fine-tuned, ε2 base: the two differ
    rec = dict(eps1=a.eps1, eps2=a.eps2, injection=a.injection, unet_calls={'inversion': 4, 'edit': 6, 'keyframes': 2, 'source': 3},
               edit_seconds=12.34,
               crop_metrics=dict(cosine_distance=0.1111, mean_frame_cosine_distance=0.2222, tl_id=0.333, tg_id=0.444, warp_error=0.5555))
    metrics = {'gallery_size': 3, 'methods': {a.name: {'identity': {'dlib': {'cosine_distance': 0.6666, 'r@1': 0.777, 'mrr': 0.888}},
                                                       'warp_error': 0.9999}}}
    table = _table({a.name: rec}, metrics, 'dlib', False)
    head = [c.strip() for c in table.splitlines()[0].strip('|').split('|')]
    got = _cells(table, a.name)
    assert len(head) == 15 and got == [
        'ft_eps1_inject', 'finetuned', 'base', 'on', '0.1111', '0.2222', '0.333', '0.444', '0.5555', '0.6666', '0.777', '0.888',
        '0.9999', '4 / 6 / 2 / 3', '12.3'], got
    assert head[6:8] == ['TL-ID ↑', 'TG-ID ↑'] and head[1:3] == ['ε1', 'ε2'] and head[8] == head[12] == 'Warp error ↓'
    assert 'Smoke run' not in table
    alone = _cells(_table({a.name: rec}, {**metrics, 'gallery_size': 1}, 'dlib', False), a.name)
    assert alone[9:13] == ['0.6666', '—', '—', '0.9999']          # the input video alone ranks first trivially: no R@1/MRR
    nan = {**rec, 'crop_metrics': {**rec['crop_metrics'], 'tl_id': float('nan'), 'warp_error': float('inf')}}
    c = _cells(_table({a.name: nan}, None, 'dlib', True), a.name)
    assert (c[6], c[8]) == ('—', '—') and c[9:13] == ['—'] * 4, c    # no evaluate metrics: its columns are empty too


def test_frame_grid_rows_of_unequal_length_span_the_shortest():
    "Rows of different lengths: the columns spread over the shortest row (no frame index past its end)."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from ipfacediff.ablations import frame_grid
    fig = frame_grid({'original': np.zeros((10, 8, 8, 3), np.uint8), 'base': np.zeros((4, 8, 8, 3), np.uint8)}, n_frames=3)
    axs = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axs[0]] == ['frame 0', 'frame 2', 'frame 3']
    plt.close(fig)


def test_crop_metrics_with_no_crop_used_is_an_error():
    "`used` all False: nothing to score — a one-line error, not NaN distances."
    from ipfacediff.ablations import crop_metrics
    x = np.zeros((3, 8, 8, 3), np.uint8); x[..., 0] = 255
    one_line_error(lambda: crop_metrics(x, x, lambda c: c.mean((2, 3)) + 1.0, used=[False, False, False]), 'no crop is marked used')


def test_crop_metrics_of_a_study_leave_out_the_frames_not_pasted(tmp_path):
    """A face, 27 frames without it (longer than the tracker bridges), the face again: the frames in the gap are not
    pasted back, so the row's identity numbers are those of the 4 face frames alone, not of all 31 crops of the span."""
    from ipfacediff.ablations import run_ablations, crop_metrics
    from ipfacediff.embedders import get_embedder
    from ipfacediff.models import save_components, tiny_components
    from ipfacediff.video import read_video, write_video
    import cv2
    f, _ = read_video(SAMPLE, max_frames=4, progress=False)
    f = np.stack([cv2.resize(x, (320, 180), interpolation=cv2.INTER_AREA) for x in f])      # half size: faster, still found
    write_video(tmp_path / 'gap.mp4', np.stack([f[0], f[1], *[np.full_like(f[0], 128)] * 27, f[2], f[3]]), 10, progress=False)
    model = save_components(tiny_components(0), tmp_path / 'model')
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            res = run_ablations(tmp_path / 'gap.mp4', 'add glasses', tmp_path / 'study', model=model, configs='base', size=64, steps=2, inversion_steps=2,
                                device='cpu', dtype='float32', cache_dir=tmp_path / 'cache', progress=False)
    finally: torch.set_num_threads(n)
    r, got = res.edits['base'], res.rows['base']['crop_metrics']
    assert r.span == (0, 31) and len(r.crops) == 31
    face = np.zeros(31, bool); face[[0, 1, 29, 30]] = True
    dlib = get_embedder('dlib')
    want, whole = crop_metrics(r.crops[face], r.source_crops[face], dlib), crop_metrics(r.crops, r.source_crops, dlib)
    for k in ('cosine_distance', 'mean_frame_cosine_distance', 'tg_id'):
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
        assert abs(whole[k] - want[k]) > 1e-3, k                 # the gap's crops would have changed it


@pytest.mark.parametrize('row', ['base', 'base_inject'])
def test_edit_command_without_propagation_keeps_injection_thresholds(row):
    """Without propagation, a row with injection still injects up to --attn-t / --conv-t: the recorded command keeps a
    non-default threshold (else its re-run injects longer); a row without injection leaves them out (`edit` refuses them)."""
    from ipfacediff.ablations import ABLATIONS, edit_command
    from ipfacediff.cli import build_parser
    from ipfacediff.pipeline import EditConfig, _settings_from_args
    a = ABLATIONS[row]
    cmd = edit_command(a, SAMPLE, 'add glasses', '/o/x.mp4', propagation=False, attn_t=0.3, conv_t=0.6)
    argv = shlex.split(cmd)[1:]
    args = build_parser(argv).parse_args(argv)
    cfg = EditConfig(args.prompt, **_settings_from_args(args)).validate()
    assert cfg.propagation is False and cfg.identity_injection is a.injection, cmd
    if a.injection: assert (cfg.attn_t, cfg.conv_t) == (0.3, 0.6), cmd
    else: assert '--attn-t' not in cmd and '--conv-t' not in cmd, cmd
