"""Mutation review (bench, ablations, facedata, cli): behaviour the other tests left unpinned. The numbers of a
`bench --json` report and how they add up, FLOP and GPU-peak bookkeeping, the warm-up length, the sync counter;
the §5.6 rows, `--configs` parsing, the recorded `ipfacediff edit` commands (they re-make the row's video), the
ablation table; image listing, caption files, image scaling, captions that stay with their image; the CLI's exit
codes (1, 2, 130, 143) and unknown options. One tiny bench run and one tiny study per module, CPU, offline."""
import contextlib, errno, io, json, math, os, shlex, signal, statistics, sys, textwrap, time, warnings
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from ipfacediff.utils import UserError, data_path
from shared import one_line_error

SAMPLE = str(data_path('sample.mp4'))


@contextlib.contextmanager
def one_thread():
    "Tiny networks run fastest on one torch thread; the thread count of the rest of the suite is left as it was."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try: yield
    finally: torch.set_num_threads(n)


def quiet_main(argv, **kw):
    "`cli.main(argv)` with stdout and stderr captured: (exit code, stdout, stderr)."
    from ipfacediff.cli import main
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e): rc = main([str(a) for a in argv], **kw)
    return rc, o.getvalue(), e.getvalue()


# ================================================================ bench: a tiny `ipfacediff bench --json` run

@pytest.fixture(scope='module')
def bench_report(tmp_path_factory):
    "`ipfacediff bench` on 2, 1 and 3 frames (not in order), 3 repeats, 2 steps, --keyframe-window 0, --no-write: the JSON report."
    d = tmp_path_factory.mktemp('bench')
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv('IPFACEDIFF_COMMIT', 'abc1234-test')
        mp.setenv('IPFACEDIFF_CACHE', str(d / 'cache'))
        rc, out, err = quiet_main(['bench', '--frames', '2', '1', '3', '--size', '64', '--steps', '2', '--repeat', '3',
                                   '--keyframe-window', '0', '--no-warmup', '--no-write', '--quiet', '--json', d / 'b.json'])
    assert rc == 0, err
    assert f"wrote {d / 'b.json'}" in out
    return json.loads((d / 'b.json').read_text())


def test_bench_report_settings(bench_report):
    "The report says what ran: the commit from IPFACEDIFF_COMMIT, --inversion-steps defaulting to --steps, --keyframe-window 0 as 'all'."
    rep = bench_report
    assert rep['commit'] == 'abc1234-test'
    assert rep['steps'] == rep['inversion_steps'] == 2 and rep['size'] == 64 and rep['keyframe_window'] is None
    for r in rep['runs']:                            # the inversion really ran 2 steps: 2 UNet rows per frame
        assert r['budget']['inversion'] == r['unet_calls']['inversion'] == 2 * r['frames'] and r['budget_ok']


def test_bench_runs_are_interleaved_repeats(bench_report):
    "One run per (repeat, --frames) in the order run, each on the number of frames asked for, none writing an mp4 under --no-write."
    runs = bench_report['runs']
    assert [(r['repeat'], r['frames']) for r in runs] == [(k, n) for k in range(3) for n in (2, 1, 3)]
    assert all('write' not in r['stages'] and 'encode' in r['stages'] for r in runs)
    by_n = {n: {r['unet_forwards'] for r in runs if r['frames'] == n} for n in (1, 2, 3)}
    assert all(len(v) == 1 and next(iter(v)) > 0 for v in by_n.values()), by_n   # UNet forwards are counted per run, not summed


def test_bench_run_totals_add_up(bench_report):
    "A run's seconds, CPU seconds and FLOPs are the sums over its stages; per frame divides by its frames; the floor ratio is seconds / floor."
    peak = bench_report['peak_tflops_measured'] * 1e12
    for r in bench_report['runs']:
        st, n = r['stages'].values(), r['frames']
        assert r['seconds'] == pytest.approx(sum(s['seconds'] for s in st), rel=1e-12)
        assert r['cpu_seconds'] == pytest.approx(sum(s['cpu_seconds'] for s in st), rel=1e-12)
        assert r['s_per_frame'] == pytest.approx(r['seconds'] / n, rel=1e-12)
        assert r['cpu_s_per_frame'] == pytest.approx(r['cpu_seconds'] / n, rel=1e-12)
        assert r['flops'] == pytest.approx(sum(s.get('flops', 0) for s in st), rel=1e-12) and r['flops'] > 0
        assert r['floor_s'] == pytest.approx(r['flops'] / peak, rel=1e-9)
        assert r['floor_ratio'] == pytest.approx(r['seconds'] / r['floor_s'], rel=1e-9)
        assert r['achieved_tflops'] == pytest.approx(r['flops'] / r['seconds'] / 1e12, rel=1e-9)


def test_bench_summary_is_over_the_repeats(bench_report):
    "summary[n]: every repeat's s/frame in order, their median (not mean), the medians per stage, the largest RSS growth."
    rep = bench_report
    assert set(rep['summary']) == {'1', '2', '3'}
    for key, s in rep['summary'].items():
        rs = [r for r in rep['runs'] if r['frames'] == int(key)]
        assert s['s_per_frame_all'] == [r['s_per_frame'] for r in rs] and len(rs) == 3
        assert s['s_per_frame_median'] == statistics.median(s['s_per_frame_all'])
        assert s['cpu_s_per_frame_median'] == statistics.median(r['cpu_s_per_frame'] for r in rs)
        assert s['stages_s_per_frame_median'] == {k: statistics.median(r['stages'][k]['s_per_frame'] for r in rs) for k in rs[0]['stages']}
        assert s['rss_growth_mb_max'] == max(r['rss_growth_mb'] for r in rs)


def test_bench_scaling_is_largest_over_smallest_frame_count(bench_report):
    "--frames 2 1 3: the scaling ratio is s/frame at 3 frames over 1 frame (not first over last given), pair by pair per repeat."
    rep, sc = bench_report, bench_report['scaling']
    assert sc['frames'] == [1, 3]
    assert sc['s_per_frame_ratio'] == pytest.approx(rep['summary']['3']['s_per_frame_median'] / rep['summary']['1']['s_per_frame_median'])
    lo, hi = ([r for r in rep['runs'] if r['frames'] == n] for n in (1, 3))
    assert sc['pair_ratios'] == pytest.approx([h['s_per_frame'] / l['s_per_frame'] for l, h in zip(lo, hi)])
    assert sc['pair_ratio_median'] == statistics.median(sc['pair_ratios'])


def test_scaling_pair_median_over_repeats():
    "With 3 repeats, the pair ratio of each repeat (high over low, in repeat order) and their median, for wall and CPU time."
    from ipfacediff.bench import _scaling
    runs = []
    for k, (lo_s, hi_s) in enumerate([(1.0, 2.0), (1.0, 2.2), (1.0, 5.0)]):
        runs += [{'frames': 8, 's_per_frame': lo_s, 'cpu_s_per_frame': 2 * lo_s}, {'frames': 32, 's_per_frame': hi_s, 'cpu_s_per_frame': hi_s}]
    summary = {'8': {'s_per_frame_median': 1.0}, '32': {'s_per_frame_median': 2.2}}
    sc = _scaling(runs, 8, 32, summary)
    assert sc['pair_ratios'] == pytest.approx([2.0, 2.2, 5.0]) and sc['pair_ratio_median'] == pytest.approx(2.2)   # mean: 3.07
    assert sc['cpu_pair_ratios'] == pytest.approx([1.0, 1.1, 2.5]) and sc['cpu_pair_ratio_median'] == pytest.approx(1.1)
    assert sc['s_per_frame_ratio'] == pytest.approx(2.2)


@pytest.mark.parametrize('kw, msg', [(dict(repeat=0), '--repeat must be at least 1, got 0'),
                                     (dict(sync_report=True, device='cpu'), '--sync-report counts waits for a GPU')])
def test_bench_refuses_before_running(kw, msg):
    "bench() refuses --repeat 0 (no run to report) and --sync-report on the CPU, with a one-line UserError, before any work."
    from ipfacediff.bench import bench
    with one_thread():
        one_line_error(lambda: bench('tiny', frames=[1], size=64, steps=1, warmup=False, write=False, log=lambda *a: None,
                                     **{'device': 'cpu', **kw}), msg)


def test_bench_unknown_compile_backend_exits_2():
    "`bench --compile --compile-backend NAME` with a backend torch does not have: exit 2, one line naming the flag."
    with one_thread():
        rc, out, err = quiet_main(['bench', '--compile', '--compile-backend', 'no_such_backend', '--frames', '1', '--size', '64',
                                   '--steps', '1', '--no-warmup', '--no-write', '--device', 'cpu'])
    assert rc == 2 and 'unknown --compile-backend' in err and err.count('\n') == 1, err


def test_build_components_refuses_an_unknown_config():
    "build_components('sd15') is an error naming the choices, not a silent tiny model."
    from ipfacediff.bench import build_components
    one_line_error(lambda: build_components('sd15'), "unknown --config 'sd15'", 'tiny, sd21')


# ---------------------------------------------------------------- bench: FLOPs, GPU peaks, warm-up, sync counter

def test_selfattn_flops_are_the_self_attention_matmuls():
    "count_flops' 'selfattn' equals what torch counts for QKᵀ and AV of the UNet's self-attention layers (math SDPA), not cross-attention."
    from torch.nn.attention import sdpa_kernel, SDPBackend
    from torch.utils.flop_counter import FlopCounterMode
    from ipfacediff.bench import count_flops
    from ipfacediff.models import tiny_components
    c = tiny_components(0)
    z, cond = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, c.text_encoder.config.hidden_size)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as fc:   # attention products as bmm's
        c.unet(z, torch.tensor([500]), encoder_hidden_states=cond)
    counts = fc.get_flop_counts()                               # per module: the projections are mm/addmm, QKᵀ and AV bmm
    attn = lambda which: sum(v for k, ops in counts.items() if k.endswith(which) for op, v in ops.items() if str(op) == 'aten.bmm')
    assert attn('attn1') > 0 and attn('attn2') > 0
    assert count_flops(c, 64)['selfattn'] == attn('attn1')


def test_count_flops_does_not_depend_on_the_device():
    "The FLOPs of one evaluation are a property of the network and the size, not of the device it was counted on."
    from ipfacediff.bench import count_flops
    from ipfacediff.models import tiny_components
    cpu = count_flops(tiny_components(0), 64)
    meta = count_flops(tiny_components(0).to('meta'), 64)
    assert cpu == meta


def test_nominal_peak_of_gpu_names():
    "Datasheet peaks by torch's GPU name: PCIe/NVL cards are not taken for their SXM sisters, A10 is not A100; unknown names and the CPU: None."
    from ipfacediff.bench import peak_for_name, nominal_peak
    assert peak_for_name('NVIDIA H100 PCIe') == 756.0 and peak_for_name('NVIDIA H100 NVL') == 835.0
    assert peak_for_name('NVIDIA H200 NVL') == 835.0 and peak_for_name('NVIDIA H100 80GB HBM3') == 989.0
    assert peak_for_name('NVIDIA H200') == 989.0
    assert peak_for_name('NVIDIA A100-SXM4-80GB') == 312.0 and peak_for_name('NVIDIA A10') == 125.0
    assert peak_for_name('NVIDIA GeForce RTX 4090') is None and nominal_peak('cpu') is None


def test_measured_peak_is_at_least_the_average_rate_torch_counts():
    "The measured peak (best timed round) is at least the FLOPs torch counts in the call over the call's wall time: matmuls count 2·n³."
    from torch.utils.flop_counter import FlopCounterMode
    from ipfacediff.bench import measured_peak
    with one_thread(), FlopCounterMode(display=False) as fc:
        t0 = time.perf_counter(); peak = measured_peak('cpu', torch.float32, 0.3); wall = time.perf_counter() - t0
    assert fc.get_total_flops() >= 5 * 2 * 512 ** 3           # the warm-up product and at least one timed round of 4
    assert peak * 1e12 >= fc.get_total_flops() / wall, (peak, fc.get_total_flops() / wall / 1e12)


def _schedule_states(cfg, n):
    "The (attention injected, features injected, step parity) combinations an n-step edit goes through."
    from ipfacediff.injection import injection_schedule
    from ipfacediff.ddim import ddim_timesteps
    return {(a, c, i % 2) for i, (a, c) in enumerate(injection_schedule(ddim_timesteps(n), cfg.attn_t, cfg.conv_t).values())}

@pytest.mark.parametrize('attn_t, conv_t', [(0.5, 0.8), (0.3, 1.0)])
def test_warmup_steps_cover_the_edit_and_are_fewest(attn_t, conv_t):
    "The --compile warm-up edit goes through every injection state of the timed edit, with as few steps as that takes (≥ 3, ≤ steps)."
    from ipfacediff.bench import warmup_steps
    from ipfacediff.pipeline import EditConfig
    for steps in (1, 2, 3, 4, 10, 25, 50):
        cfg = EditConfig('x', steps=steps, inversion_steps=steps, attn_t=attn_t, conv_t=conv_t)
        w, want = warmup_steps(cfg), _schedule_states(cfg, steps)
        assert min(3, steps) <= w <= steps and _schedule_states(cfg, w) >= want, (steps, w)
        assert w == min(3, steps) or not _schedule_states(cfg, w - 1) >= want, (steps, w)


def test_sync_counter_counts_waits_by_stage_and_passes_other_warnings():
    "Sync warnings are counted per stage (the stage is restored on leaving it); other warnings still reach the user, uncounted."
    from ipfacediff.bench import SyncCounter, SYNC_WARNING
    sc = SyncCounter()
    sync = lambda: warnings.warn(f'an op {SYNC_WARNING}', UserWarning)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter('always')
        with sc.watch(cuda=False):
            with sc('edit'):
                sync(); sync()
                with sc('decode'): sync()
                sync()
            sync()
            warnings.warn('something else', UserWarning)
    assert sc.by_stage() == {'edit': 3, 'decode': 1, '-': 1}
    assert sc.top(1)[0][0] == 'edit' and sc.top(1)[0][2] == 3 and sum(n for _, _, n in sc.top()) == 5
    assert [str(w.message) for w in shown] == ['something else']


def test_sync_site_names_the_innermost_library_frame_and_our_caller():
    "A sync site reads 'innermost ipfacediff/diffusers/peft frame ← innermost ipfacediff frame'; outside them, the warning's own file:line."
    import traceback
    from ipfacediff.bench import _sync_site
    F = lambda f, l: traceback.FrameSummary(f, l, 'fn')
    stack = [F('/x/site-packages/ipfacediff/bench.py', 5), F('/x/site-packages/ipfacediff/pipeline.py', 10),
             F('/x/site-packages/diffusers/models/unet.py', 20), F('/x/site-packages/diffusers/models/attention.py', 30),
             F('/usr/lib/python3/site-packages/torch/nn/functional.py', 40)]
    assert _sync_site(stack) == 'diffusers/models/attention.py:30 ← ipfacediff/pipeline.py:10'
    assert _sync_site(stack[:2]) == 'ipfacediff/pipeline.py:10'
    assert _sync_site(stack[4:], '/usr/lib/torch/cuda/__init__.py', 7) == '__init__.py:7'


# ---------------------------------------------------------------- CLI defaults = API defaults

def test_cli_defaults_are_the_api_defaults():
    "`ipfacediff bench` / `ablations` with no options run what bench() / run_ablations() and EditConfig run by default."
    import inspect
    from ipfacediff.cli import build_parser
    from ipfacediff.bench import bench
    from ipfacediff.ablations import run_ablations
    from ipfacediff.pipeline import EditConfig
    b = build_parser(['bench']).parse_args(['bench'])
    sig = {k: p.default for k, p in inspect.signature(bench).parameters.items()}
    assert (b.config, list(sig['frames']), b.repeat, b.branches, b.keyframe_window, b.seed) == \
           (sig['config'], b.frames, sig['repeat'], sig['branches'], sig['keyframe_window'], sig['seed'])
    a = build_parser(['ablations']).parse_args(['ablations', 'v.mp4', '--prompt', 'p', '--out', 'o'])
    d, sig = EditConfig('p'), {k: p.default for k, p in inspect.signature(run_ablations).parameters.items()}
    assert (a.guidance, a.batch_size, a.source_prompt, a.seed) == (d.guidance, d.batch_size, d.source_prompt, d.seed)
    assert (a.model, a.recognizers, a.grid_frames) == (sig['model'], sig['recognizers'], sig['grid_frames'])


# ================================================================ ablations: rows, commands, table

ROWS = {'base': ('base', 'base', False), 'base_inject': ('base', 'base', True), 'ft_eps2': ('base', 'finetuned', False),
        'ft_eps1_inject': ('finetuned', 'base', True), 'full': ('finetuned', 'finetuned', True),
        'full_no_inject': ('finetuned', 'finetuned', False)}

def test_ablation_rows_are_the_papers():
    "§5.6: which branch is fine-tuned and whether ε1 is injected, per row; specs hands each row the right branch paths."
    from ipfacediff.ablations import ABLATIONS, Ablation
    assert {n: (a.eps1, a.eps2, a.injection) for n, a in ABLATIONS.items()} == ROWS and list(ABLATIONS) == list(ROWS)
    for n, (e1, e2, _) in ROWS.items():
        assert ABLATIONS[n].specs('I', 'E') == ('I' if e1 == 'finetuned' else None, 'E' if e2 == 'finetuned' else None), n
    with pytest.raises(ValueError): Ablation('x', 'base', 'fine-tuned', False)


def test_select_ablations_parses_configs():
    "--configs: names in the order given, spaces allowed; all rows by default; unknown, repeated or no names are one-line errors."
    from ipfacediff.ablations import select_ablations
    assert [a.name for a in select_ablations(' full , base ')] == ['full', 'base']
    assert [a.name for a in select_ablations(None)] == list(ROWS)
    one_line_error(lambda: select_ablations('base,full,base'), 'named twice')
    one_line_error(lambda: select_ablations(' , '), 'no configuration given')
    one_line_error(lambda: select_ablations(['base', 'nope']), "unknown configuration 'nope'")


def _edit_config_of(cmd: str):
    "The EditConfig (and parsed args) that `ipfacediff edit` would run for the command line `cmd`."
    from ipfacediff.cli import build_parser
    from ipfacediff.pipeline import EditConfig, _settings_from_args
    argv = shlex.split(cmd)
    assert argv[:2] == ['ipfacediff', 'edit']
    a = build_parser(argv[1:]).parse_args(argv[1:])
    return EditConfig(a.prompt, **_settings_from_args(a)).validate(), a

@pytest.mark.parametrize('row', list(ROWS))
@pytest.mark.parametrize('propagation', [True, False])
def test_edit_command_recreates_the_rows_settings(row, propagation):
    "The recorded `ipfacediff edit` command, parsed by `edit` itself, gives the row's EditConfig, branches, model, device and dtype."
    from dataclasses import asdict, replace
    from ipfacediff.ablations import ABLATIONS, edit_command
    from ipfacediff.pipeline import EditConfig
    a = ABLATIONS[row]
    cfg = EditConfig('add glasses', steps=10, inversion_steps=50, size=64, guidance=5.0, batch_size=4, fps=10.0, max_frames=3,
                     seed=3, mask='head', source_prompt='a photo of a man', identity_injection=a.injection, propagation=propagation,
                     **(dict(keyframe_window=None, attn_t=0.4, conv_t=0.9, nn_from='source') if propagation else dict(keyframe_window=None)))
    cmd = edit_command(a, SAMPLE, cfg.prompt, '/o/x.mp4', model='/models/sd21', identity_model='/b/eps1', edit_model='/b/eps2',
                       device='cpu', dtype=torch.float32, **{k: v for k, v in asdict(cfg).items() if k not in ('prompt', 'identity_injection')})
    got, args = _edit_config_of(cmd)
    want = cfg if propagation else replace(cfg, keyframe_window=got.keyframe_window)   # no propagation: no keyframes to window
    assert got == want, cmd
    assert (args.input, args.out, args.model, args.device, args.dtype) == (SAMPLE, '/o/x.mp4', '/models/sd21', 'cpu', 'float32')
    assert (args.identity_model, args.edit_model) == ('/b/eps1' if a.eps1 == 'finetuned' else None, '/b/eps2' if a.eps2 == 'finetuned' else None)


def test_crop_metrics_video_distance_is_of_the_mean_embeddings():
    "'cosine_distance' compares the mean embedding over all frames (not frame 0); one frame has no TL-ID/TG-ID/warp error."
    from ipfacediff.ablations import crop_metrics
    colour = lambda *rgb: np.broadcast_to(np.array(rgb, np.uint8), (8, 8, 3))
    src = np.stack([colour(255, 0, 0), colour(255, 255, 0)])          # red, yellow: mean (2, 1, 0)·127.5
    edited = np.stack([colour(255, 0, 0), colour(0, 255, 0)])         # red, green:  mean (1, 1, 0)·127.5
    mean_rgb = lambda x: x.mean((2, 3))
    m = crop_metrics(edited, src, mean_rgb)
    assert m['cosine_distance'] == pytest.approx(1 - 3 / math.sqrt(10), abs=1e-6)
    one = crop_metrics(edited[:1], src[:1], mean_rgb, edited_frames=edited[:1])
    assert one['tl_id'] is None and one['tg_id'] is None and one['warp_error'] is None


def test_frame_grid_columns_span_first_to_last_frame():
    "The grid's columns are spread from the first to the last frame of the shortest row; one row per entry, labelled."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from ipfacediff.ablations import frame_grid
    crops = np.zeros((10, 8, 8, 3), np.uint8)
    fig = frame_grid({'original': crops, 'full': crops}, n_frames=4, labels={'full': 'the full method'})
    axs = np.array(fig.axes).reshape(2, 4)
    assert [ax.get_title() for ax in axs[0]] == ['frame 0', 'frame 3', 'frame 6', 'frame 9']
    assert [ax.get_ylabel() for ax in axs[:, 0]] == ['original', 'the full method']
    plt.close(fig)


def test_clean_and_replace_paths_for_the_json():
    "ablations.json holds no NaN/inf (invalid JSON: null instead), plain ints and strings; temporary paths are rewritten inside lists too."
    from ipfacediff.ablations import _clean, _replace_paths
    c = _clean({'a': np.float32('nan'), 1: [np.int64(3), Path('/x'), float('inf'), 0.5]})
    assert c == {'a': None, '1': [3, '/x', None, 0.5]}
    json.loads(json.dumps(c), parse_constant=lambda s: pytest.fail(f'{s} in the JSON'))
    assert _replace_paths({'v': ['/tmp/t1/a.mp4', {'w': '/tmp/t1/b'}], 'n': 3}, '/tmp/t1', '/out') == {'v': ['/out/a.mp4', {'w': '/out/b'}], 'n': 3}


def test_run_ablations_refuses_identity_injection_setting(tmp_path):
    "Injection is set per row: identity_injection= in the settings is a one-line error, before anything is written."
    from ipfacediff.ablations import run_ablations
    one_line_error(lambda: run_ablations(SAMPLE, 'add glasses', tmp_path / 's', configs='base', identity_injection=False),
                   'identity injection is set per configuration')
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('flag', ['--identity-model', '--edit-model'])
def test_tiny_refuses_given_branches(tmp_path, flag):
    "`ablations --tiny` makes its own branches: --identity-model or --edit-model alone is refused (exit 2, one line), not silently ignored."
    rc, out, err = quiet_main(['ablations', SAMPLE, '--prompt', 'add glasses', '--out', tmp_path / 's', '--tiny', '--quiet',
                               flag, tmp_path / 'eps', '--cache-dir', tmp_path / 'cache'])
    assert rc == 2 and 'drop --identity-model / --edit-model' in err and err.count('\n') == 1, err
    assert not (tmp_path / 's').exists()


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    "`ipfacediff ablations` (not --tiny) with a tiny model folder: rows base and base_inject, 3 frames at 64², --steps 2."
    from ipfacediff.models import save_components, tiny_components
    d = tmp_path_factory.mktemp('study')
    model = save_components(tiny_components(0), d / 'model')
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        rc, out, err = quiet_main(['ablations', SAMPLE, '--prompt', 'add glasses', '--out', d / 'study', '--model', model,
                                   '--configs', 'base,base_inject', '--size', '64', '--steps', '2', '--max-frames', '3',
                                   '--grid-frames', '3', '--device', 'cpu', '--dtype', 'float32', '--cache-dir', d / 'cache', '--quiet'])
    assert rc == 0, err
    out_dir = d / 'study'
    return d, out_dir, json.loads((out_dir / 'ablations.json').read_text()), (out_dir / 'ablations.md').read_text()


def test_study_inversion_steps_default_to_steps(study):
    "Without --inversion-steps the study inverts with --steps (as `ipfacediff edit` does), and its commands say so."
    _, _, j, _ = study
    assert j['settings']['steps'] == j['settings']['inversion_steps'] == 2
    for r in j['rows'].values(): assert '--inversion-steps 2' in r['command']


def test_study_recorded_command_remakes_the_rows_video(study):
    "Running row base's recorded `ipfacediff edit` command gives its video frame for frame (no injection, same model, device, dtype)."
    from ipfacediff.video import read_video
    d, out, j, _ = study
    argv = shlex.split(j['rows']['base']['command'])
    assert '--no-identity-injection' in argv
    argv[argv.index('--out') + 1] = str(d / 'again.mp4')
    with one_thread(): rc, o, err = quiet_main(argv[1:] + ['--cache-dir', d / 'cache-again', '--quiet'])
    assert rc == 0, err
    again, _ = read_video(d / 'again.mp4', progress=False)
    row, _ = read_video(out / j['rows']['base']['video'], progress=False)
    inj, _ = read_video(out / j['rows']['base_inject']['video'], progress=False)
    assert len(row) == 3 and np.array_equal(again, row)
    assert not np.array_equal(row, inj)             # the two rows really differ: injection on in one, off in the other


def test_study_edit_seconds_leave_out_reading_and_tracking(study):
    "'edit_seconds' (the table's Seconds column) sums the stages from encoding to the written mp4: not reading, not face tracking."
    _, _, j, _ = study
    for r in j['rows'].values():
        t = r['timings']
        assert r['edit_seconds'] == pytest.approx(sum(t[s]['seconds'] for s in ('encode', 'inversion', 'edit', 'decode', 'paste-back', 'write') if s in t))
        assert 'track/align' in t and r['seconds'] > r['edit_seconds'] + t['track/align']['seconds'] * 0.99


def test_study_no_face_flag_and_table(study):
    "Every row's evaluate_no_face is evaluate's own verdict; the table shows each row's injection and UNet calls (inv / edit / kf / source), no R@1 without a gallery."
    _, out, j, table = study
    metrics = json.loads((out / 'metrics' / 'metrics.json').read_text())
    lines = [l for l in table.splitlines() if l.startswith('| base')]
    assert len(lines) == 2
    for line, (n, r) in zip(lines, j['rows'].items()):
        assert r['evaluate_no_face'] is (not metrics['methods'][n]['videos']['sample']['face_found']), n
        cells = [c.strip() for c in line.strip('|').split('|')]
        c = r['unet_calls']
        assert cells[0] == n and cells[3] == ('on' if ROWS[n][2] else 'off')
        assert cells[13] == f"{c.get('inversion', 0)} / {c.get('edit', 0)} / {c.get('keyframes', 0)} / {c.get('source', 0)}"
        assert cells[10] == cells[11] == '—'                 # R@1, MRR: no --gallery, one video ranks first trivially
    assert j['rows']['base']['unet_calls']['inversion'] > 0 and not j['rows']['base_inject']['unet_calls'].get('inversion')


# ================================================================ facedata

def _png(path, colour=(200, 100, 50), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, colour).save(path, format='PNG')
    return path


def test_list_images_finds_every_image_under_the_folder(tmp_path):
    "Images in sub-folders and with upper-case extensions count; hidden files, other files and folders named like images do not."
    for p in ('b.PNG', 'a.jpg', 'sub/c.jpeg', '.hidden.png'): _png(tmp_path / p)
    (tmp_path / 'notes.txt').write_text('x'); (tmp_path / 'dir.png').mkdir()
    from ipfacediff.facedata import list_images, FaceDataset
    assert list_images(tmp_path) == ['a.jpg', 'b.PNG', 'sub/c.jpeg']
    assert FaceDataset(tmp_path, size=8, quiet=True).paths == ['a.jpg', 'b.PNG', 'sub/c.jpeg']
    (tmp_path / 'empty').mkdir()
    one_line_error(lambda: list_images(tmp_path / 'empty'), 'no images')
    one_line_error(lambda: list_images(tmp_path / 'notes.txt'), 'is a file')


def test_read_captions_normalises_and_names_bad_lines(tmp_path):
    "Blank lines are skipped, './x.png' means 'x.png', caption whitespace is collapsed; a bad line is named by its 1-based number."
    from ipfacediff.facedata import read_captions
    f = tmp_path / 'c.jsonl'
    f.write_text('{"image": "./a.png", "caption": "  a  man\\twith   hair "}\n\n{"image": "sub/b.png", "caption": "café"}\n', encoding='utf-8')
    assert read_captions(f) == {'a.png': 'a man with hair', 'sub/b.png': 'café'}
    f.write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png"\n')
    one_line_error(lambda: read_captions(f), f'{f}:3 is not JSON')
    f.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": "   "}\n')
    one_line_error(lambda: read_captions(f), f'{f}:2 needs', 'non-empty')
    f.write_text('\n\n')
    one_line_error(lambda: read_captions(f), 'is empty')


def test_write_captions_round_trip_and_no_silent_overwrite(tmp_path):
    "Captions written are read back unchanged; an existing file is kept unless overwrite=True."
    from ipfacediff.facedata import read_captions, write_captions
    f, caps = tmp_path / 'c.jsonl', {'a.png': 'a woman, wearing eyeglasses', 'sub/b.png': 'un homme âgé'}
    write_captions(caps, f)
    assert read_captions(f) == caps
    before = f.read_bytes()
    one_line_error(lambda: write_captions({'x.png': 'other'}, f), 'already exists', '--overwrite')
    assert f.read_bytes() == before
    write_captions({'x.png': 'other'}, f, overwrite=True)
    assert read_captions(f) == {'x.png': 'other'}


def test_load_image_resizes_to_size_and_scales_to_one(tmp_path):
    "A smaller image is enlarged to size²; white is exactly 1.0, mid-grey 128/255."
    from ipfacediff.facedata import load_image
    x = load_image(_png(tmp_path / 'w.png', (255, 255, 255), (8, 8)), 16)
    assert x.shape == (3, 16, 16) and bool((x == 1.0).all())
    g = load_image(_png(tmp_path / 'g.png', (128, 128, 128), (4, 4)))
    assert g.shape == (3, 4, 4) and torch.allclose(g, torch.full_like(g, 128 / 255))


def test_caption_images_refuses_an_existing_out_before_loading_blip2(tmp_path):
    "An existing captions file is refused first (no model loaded: a bad model name is not even reached), and left as it was."
    from ipfacediff.facedata import caption_images
    _png(tmp_path / 'imgs' / 'a.png')
    out = tmp_path / 'caps.jsonl'; out.write_text('old\n')
    one_line_error(lambda: caption_images(tmp_path / 'imgs', model=str(tmp_path / 'no-such-blip2'), out=out, progress=False),
                   'already exists', '--overwrite')
    assert out.read_text() == 'old\n'


def test_caption_images_batches_cover_every_readable_image(tmp_path):
    "Batches of 2 over 3 readable images and 1 broken file: 3 captions (written and read back), 1 unreadable image reported."
    from test_inputs_and_caches import tiny_blip2
    from ipfacediff.facedata import caption_images, read_captions
    model = tiny_blip2(tmp_path / 'blip')
    for n, c in zip('abc', [(200, 100, 50), (20, 30, 40), (90, 90, 90)]): _png(tmp_path / 'imgs' / f'{n}.png', c, (40, 40))
    (tmp_path / 'imgs' / 'broken.png').write_bytes(b'not a png')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        caps = caption_images(tmp_path / 'imgs', model=str(model), out=tmp_path / 'c.jsonl', device='cpu', dtype='float32',
                              batch_size=2, max_new_tokens=3, progress=False)
    assert sorted(caps) == ['a.png', 'b.png', 'c.png'] and all(caps.values())
    assert read_captions(tmp_path / 'c.jsonl') == caps
    assert any('skipped 1 unreadable' in str(x.message) and 'broken.png' in str(x.message) for x in w)


def test_load_attributes_refuses_a_table_without_attributes(tmp_path):
    "A prompt table that is not JSON, or has no 'attributes' list, is a one-line error."
    from ipfacediff.facedata import load_attributes
    (tmp_path / 't.json').write_text('{"extra": []}')
    one_line_error(lambda: load_attributes(tmp_path / 't.json'), "no 'attributes' list")
    (tmp_path / 'bad.json').write_text('{')
    one_line_error(lambda: load_attributes(tmp_path / 'bad.json'), 'could not read the prompt table')


TABLE = {'attributes': [{'name': 'A', 'category': 'facial feature', 'targets': ['smiling']},
                        {'name': 'B', 'category': None, 'targets': ['blurry']},
                        {'name': 'C', 'category': 'facial attribute', 'targets': ['with a beard', 'with a moustache']}],
         'extra': [{'name': 'D', 'category': 'facial feature', 'targets': ['surprised']}], 'generic_reference': 'a photo of a face'}

def test_edit_prompts_follow_categories_and_extra():
    "Only the chosen categories' phrases (never category null); 'extra' only when asked; p_tar composed from the caption, p_ref the caption."
    from ipfacediff.facedata import EditPrompts
    phrases = lambda **kw: sorted(ph for _, _, ph in EditPrompts(TABLE, **kw).phrases)
    assert phrases() == ['smiling', 'surprised', 'with a beard', 'with a moustache']
    assert phrases(extra=False) == ['smiling', 'with a beard', 'with a moustache']
    assert phrases(categories=('facial attribute',)) == ['with a beard', 'with a moustache']
    assert EditPrompts.compose('a woman with long hair.', 'wearing eyeglasses') == 'a woman with long hair, wearing eyeglasses'
    pairs = EditPrompts(TABLE, extra=False).pairs('a man.')
    assert sorted(pairs) == [('a man, smiling', 'a man.'), ('a man, with a beard', 'a man.'), ('a man, with a moustache', 'a man.')]


def test_face_dataset_keeps_each_caption_with_its_image(tmp_path):
    "Unreadable and uncaptioned images are skipped and named; the captions of the others stay with their own image."
    from ipfacediff.facedata import FaceDataset
    for n, c in zip('acd', [(250, 0, 0), (0, 250, 0), (0, 0, 250)]): _png(tmp_path / f'{n}.png', c)
    (tmp_path / 'b.png').write_bytes(b'broken')
    caps = {'a.png': 'red', 'b.png': 'broken', 'c.png': 'green', 'zzz.png': 'absent'}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        ds = FaceDataset(tmp_path, caps, size=8)
    assert [(x['path'], x['caption'], x['index']) for x in ds] == [('a.png', 'red', 0), ('c.png', 'green', 1)]
    assert ds.skipped['d.png'] == 'no caption' and ds.skipped['b.png'].startswith('unreadable')
    assert any('1 caption(s) name images not in' in str(x.message) for x in w)
    assert any('skipped 2 of 4 images' in str(x.message) for x in w)


def test_face_dataset_image_broken_later_gives_the_next_image_with_its_caption(tmp_path):
    "An image that stops decoding after the dataset was made: the next image is returned with its own caption and index."
    from ipfacediff.facedata import FaceDataset
    for n in 'abc': _png(tmp_path / f'{n}.png')
    ds = FaceDataset(tmp_path, {'a.png': 'A', 'b.png': 'B', 'c.png': 'C'}, size=8, quiet=True)
    (tmp_path / 'b.png').write_bytes(b'now broken')
    x = ds[1]
    assert (x['path'], x['caption'], x['index']) == ('c.png', 'C', 2)


def test_face_dataset_with_nothing_usable_is_an_error(tmp_path):
    "A folder whose only image cannot be read: one-line error, not an empty dataset."
    from ipfacediff.facedata import FaceDataset
    (tmp_path / 'a.png').write_bytes(b'broken')
    one_line_error(lambda: FaceDataset(tmp_path, size=8, quiet=True), 'none of the 1 images', 'is usable')


# ================================================================ cli: exit codes, unknown options

FAKE = '''
import os, signal, errno, time
from ipfacediff.utils import UserError
def add_cli(sub):
    p = sub.add_parser('boom'); p.add_argument('what'); p.set_defaults(func=run)
def run(a):
    if a.what == 'user': raise UserError('bad value for --x')
    if a.what == 'oserror': raise OSError(errno.ENOSPC, 'No space left on device', '/full/disk/out.mp4')
    if a.what == 'ctrlc': raise KeyboardInterrupt
    if a.what == 'sigterm':
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None): raise RuntimeError('no SIGTERM handler')
        os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); raise RuntimeError('SIGTERM did not interrupt')
'''

@pytest.fixture
def fake_commands(tmp_path, monkeypatch):
    "A command set for `cli.main(commands=...)`: `boom WHAT` raises what a real command can; `slow` is interrupted while importing."
    (tmp_path / 'ipfd_boom_cmd.py').write_text(FAKE)
    (tmp_path / 'ipfd_ctrlc_import.py').write_text('raise KeyboardInterrupt\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    yield {'boom': ('ipfd_boom_cmd', 'raises'), 'slow': ('ipfd_ctrlc_import', 'interrupted while importing'),
           'ghost': ('ipfd_no_such_module', 'not part of this build')}
    for m in ('ipfd_boom_cmd', 'ipfd_ctrlc_import'): sys.modules.pop(m, None)


@pytest.mark.parametrize('what, code, msg', [('user', 2, 'ipfacediff: error: bad value for --x'),
                                             ('oserror', 1, 'ipfacediff: error: No space left on device: /full/disk/out.mp4'),
                                             ('ctrlc', 130, 'ipfacediff: interrupted'),
                                             ('sigterm', 143, 'ipfacediff: terminated')])
def test_exit_codes(fake_commands, what, code, msg):
    "Bad input 2, a refused file operation 1 (with the file), Ctrl-C 130, SIGTERM 143 — one line each; the SIGTERM handler is restored."
    mine = lambda signum, frame: None                # the caller's own SIGTERM handler, there before and after the command
    before = signal.signal(signal.SIGTERM, mine)
    try:
        rc, out, err = quiet_main(['boom', what], commands=fake_commands)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally: signal.signal(signal.SIGTERM, before)
    assert (rc, err) == (code, msg + '\n')


def test_ctrl_c_while_a_command_imports_exits_130(fake_commands):
    "Ctrl-C during the seconds the command's module imports (torch, diffusers): 'interrupted', exit 130, no traceback."
    rc, out, err = quiet_main(['slow'], commands=fake_commands)
    assert (rc, err) == (130, 'ipfacediff: interrupted\n')


def test_a_command_not_in_this_build_is_unknown(fake_commands, capsys):
    "A command whose module is not installed is not offered: argparse's invalid-choice error, exit 2."
    from ipfacediff.cli import main
    with pytest.raises(SystemExit) as e: main(['ghost'], commands=fake_commands)
    assert e.value.code == 2 and "invalid choice: 'ghost'" in capsys.readouterr().err


def test_unknown_option_is_refused_and_blamed_on_its_command(tmp_path, capsys):
    "An unknown option after the command: exit 2, one line from that command's parser, nothing run; before it: the top level's."
    from ipfacediff.cli import main
    out = tmp_path / 'demo.png'
    with pytest.raises(SystemExit) as e: main(['ddim-demo', '--out', str(out), '--steps', '5', '--bogus'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == 'ipfacediff ddim-demo: error: unrecognized arguments: --bogus (see ipfacediff ddim-demo --help)\n'
    assert not out.exists()
    with pytest.raises(SystemExit) as e: main(['--bogus', 'ddim-demo', '--out', str(out), '--steps', '5'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('ipfacediff: error: unrecognized arguments: --bogus') and err.count('\n') == 1
    assert not out.exists()
