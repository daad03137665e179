"""Invariants of the collection, caption-file and Python-API changes that only the notebooks checked (mutation review of
metrics.list_media/load_media/evaluate, facedata.read_captions/FaceDataset, finetune's LoRA checks, pipeline's EditConfig,
edit/edit_video, inversion cache and shared-UNet refusal, injection_schedule's rounding, encode_prompt's truncation warning,
adapter-file branches, resolve_dtype and get_embedder's RNG): each test fails on at least one code change that the rest of
tests/ let through. Tiny random models, one core; dlib runs in two tests only (evaluate, one real edit)."""
import os, shutil, warnings
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image

from shared import one_line_error
from ipfacediff.utils import UserError, data_path

torch.set_num_threads(1)
SAMPLE = data_path('sample.mp4')


def _said(f):
    "Call `f` recording every warning; return (result, [messages])."
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        r = f()
    return r, [str(x.message) for x in w]

def _png(p, h=8, w=8, v=0):
    Path(p).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), v, np.uint8)).save(p)
    return p


@pytest.fixture(scope='module')
def tc():
    from ipfacediff.models import tiny_components
    return tiny_components(0)


# ---------------------------------------------------------------- metrics: collections

def test_list_media_names_every_entry_it_leaves_out_in_one_warning(tmp_path):
    "A GIF, notes and a folder whose frames are one level deeper are named (folders with '/'); hidden files and media are not."
    from ipfacediff.metrics import list_media
    d = tmp_path / 'c'
    _png(d / 'a.png'); _png(d / 'frames' / '0.png'); _png(d / 'nested' / 'frames' / '1.png')
    (d / 'b.gif').write_bytes(b'GIF89a'); (d / 'notes.txt').write_text('x'); (d / '.DS_Store').write_text('x')
    items, said = _said(lambda: list_media(d))
    assert list(items) == ['a', 'frames']
    assert len(said) == 1 and 'left out 3 entries that are not a video' in said[0], said
    assert said[0].endswith(': b.gif, nested/, notes.txt') and '.DS_Store' not in said[0], said
    (d / 'b.gif').unlink(); (d / 'notes.txt').unlink()
    _, said = _said(lambda: list_media(d))
    assert len(said) == 1 and 'left out 1 entry that is not' in said[0] and said[0].endswith(': nested/'), said
    shutil.rmtree(d / 'nested')
    assert _said(lambda: list_media(d))[1] == []                       # nothing left out, nothing said
    for k in range(7): (d / f'n{k}.txt').write_text('x')
    _, said = _said(lambda: list_media(d))
    assert 'left out 7 entries' in said[0] and said[0].endswith('n0.txt, n1.txt, n2.txt, n3.txt, n4.txt ...'), said


def test_load_media_reads_a_multipage_image_as_its_first_frame_and_says_so(tmp_path):
    from ipfacediff.metrics import load_media
    pages = [Image.fromarray(np.full((6, 10, 3), v, np.uint8)) for v in (10, 200, 90)]
    pages[0].save(tmp_path / 'anim.tif', save_all=True, append_images=pages[1:])
    fr, said = _said(lambda: load_media(tmp_path / 'anim.tif'))
    assert fr.shape == (1, 6, 10, 3) and (fr == 10).all()
    assert len(said) == 1 and 'anim.tif holds 3 frames (animated or multi-page): only the first is read' in said[0], said
    pages[0].save(tmp_path / 'still.tif')                                # one page: no warning
    fr, said = _said(lambda: load_media(tmp_path / 'still.tif'))
    assert fr.shape == (1, 6, 10, 3) and said == []


def test_load_media_names_the_frame_of_another_size(tmp_path):
    "The first frame that differs (not the last, not the first) is named with width×height, beside the first frame's size."
    from ipfacediff.metrics import load_media
    for k, (h, w) in enumerate([(8, 8), (8, 8), (6, 10), (8, 8), (4, 4)]): _png(tmp_path / 'seq' / f'{k}.png', h, w)
    one_line_error(lambda: load_media(tmp_path / 'seq'), 'differ in size: 2.png is 10×6, 0.png 8×8', 'a frame sequence needs one size')


def test_evaluate_leaves_out_unscorable_distractors_but_not_an_edited_original(tmp_path):
    """An original with no edit and no face, and a damaged gallery file, are distractors: left out with a warning, the
    evaluation goes on. An original that an edit is paired with and that shows no face still stops it (dlib)."""
    from ipfacediff.metrics import evaluate
    (tmp_path / 'orig').mkdir(); (tmp_path / 'ed').mkdir(); (tmp_path / 'gal').mkdir()
    for d in ('orig', 'ed'): shutil.copy(SAMPLE, tmp_path / d / 'clip.mp4')
    _png(tmp_path / 'orig' / 'blank.png', 64, 64, 128)
    (tmp_path / 'gal' / 'broken.png').write_bytes(b'not an image')
    res, said = _said(lambda: evaluate(tmp_path / 'orig', tmp_path / 'ed', tmp_path / 'rep', gallery=tmp_path / 'gal',
                                       max_frames=2, progress=False))
    assert any('original blank (no edit of it given): no face found, left out of the gallery' in m for m in said), said
    assert any('gallery item broken: cannot read the image' in m and m.endswith('left out') for m in said), said
    assert res['gallery_size'] == 1 and res['methods']['ed']['identity']['dlib']['r@1'] == 1.0
    _png(tmp_path / 'ed' / 'blank.png', 64, 64, 128)                     # now an edit is paired with the faceless original
    with pytest.raises(UserError, match='no face'):
        evaluate(tmp_path / 'orig', tmp_path / 'ed', tmp_path / 'rep2', max_frames=2, progress=False)


# ---------------------------------------------------------------- facedata: caption files

WANT = {'a.png': 'a face', 'sub/b.png': 'a smiling face'}

@pytest.mark.parametrize('name,text', [
    ('one.jsonl', '{"image": "a.png", "caption": "a face"}'),                                # one JSONL line is not {image: caption}
    ('metadata.jsonl', '{"file_name": "a.png", "text": "a face"}\n{"file_name": "sub/b.png", "text": "a smiling face"}\n'),
    ('array.json', '[{"image": "a.png", "caption": "a face"},\n {"file_name": "sub/b.png", "text": "a smiling face"}]'),
    ('object.json', ' {"a.png": "a face",\n "sub/b.png": "a  smiling face"}'),
    ('metadata.csv', 'file_name,text\na.png,a face\nsub/b.png,"a smiling, face"\n'),
    ('captions.tsv', 'image\tcaption\na.png\ta face\nsub/b.png\ta smiling, face\n'),
    ('CAPS.TSV', 'caption\timage\na face\ta.png\n'),
])
def test_read_captions_reads_the_shapes_other_tools_write(tmp_path, name, text):
    from ipfacediff.facedata import read_captions
    (tmp_path / name).write_text(text)
    got = read_captions(tmp_path / name)
    want = {k: v for k, v in WANT.items() if k in got}
    if name.endswith(('.csv', '.tsv')) and 'sub/b.png' in got: want['sub/b.png'] = 'a smiling, face'   # the comma is the caption's
    assert got == want and 'a.png' in got


def test_caption_files_that_cannot_be_read_name_where(tmp_path):
    from ipfacediff.facedata import read_captions
    cases = {'cols.csv': ('path,description\na.png,a face\n', "needs a header row with an 'image' (or 'file_name') and a 'caption'"),
             'half.csv': ('image,notes\na.png,a face\n', "got ['image', 'notes']"),
             'row.csv': ('image,caption\na.png,a face\nb.png,\n', 'row.csv:3 needs a string'),          # line 3: header + 2 rows
             'bad.json': ('[{"image": "a.png", "caption": "x"},', 'starts like a JSON array but is not JSON'),
             'item.json': ('[{"image": "a.png", "caption": "x"}, {"image": "b.png"}]', 'item.json item 2 needs a string'),
             'noname.jsonl': ('{"image": "a.png", "caption": "x"}\n{"image": "  ", "caption": "y"}\n', 'noname.jsonl:2 needs a string')}
    for name, (text, part) in cases.items():
        (tmp_path / name).write_text(text)
        one_line_error(lambda: read_captions(tmp_path / name), part)


def test_an_image_captioned_twice_warns_only_when_the_captions_differ_and_keeps_the_last(tmp_path):
    from ipfacediff.facedata import read_captions
    f = tmp_path / 'c.jsonl'
    f.write_text('{"image": "a.png", "caption": "a face"}\n{"image": "b.png", "caption": "x"}\n{"image": "./a.png", "caption": "a  face"}\n')
    caps, said = _said(lambda: read_captions(f))
    assert caps == {'a.png': 'a face', 'b.png': 'x'} and said == []     # the same caption again (spacing aside): nothing to say
    f.write_text(f.read_text() + '{"image": "a.png", "caption": "an old face"}\n')
    caps, said = _said(lambda: read_captions(f))
    assert caps['a.png'] == 'an old face'
    assert len(said) == 1 and f'1 image(s) are captioned more than once with different text, and the last caption is used: e.g. a.png ({f}:1, last {f}:4)' in said[0], said


def test_captions_with_absolute_paths_into_the_folder_match_their_images(tmp_path, monkeypatch):
    """Written through a link to the folder (given so), with the folder's real path (folder given relative), or with `~`: each matches, nothing skipped or warned;
    an absolute path outside the folder is still one caption for an image not there."""
    from ipfacediff.facedata import FaceDataset, write_captions
    real = tmp_path / 'real'
    for k in WANT: _png(real / k)
    (tmp_path / 'link').symlink_to(real, target_is_directory=True)
    monkeypatch.setenv('HOME', str(tmp_path)); monkeypatch.chdir(tmp_path)
    for folder, base in ((tmp_path / 'link', str(tmp_path / 'link')), ('real', str(real.resolve())), ('~/link', '~/link'), (real, '~/real'),
                         ('link', str(tmp_path / 'link'))):   # relative folder, captions through the link (macOS's /tmp)
        write_captions({f'{base}/{k}': v for k, v in WANT.items()}, tmp_path / 'abs.jsonl', overwrite=True)
        ds, said = _said(lambda: FaceDataset(folder, tmp_path / 'abs.jsonl', size=8))
        assert dict(zip(ds.paths, ds.captions)) == WANT and ds.skipped == {} and said == [], (folder, base, said)
    ds, said = _said(lambda: FaceDataset('real', {**WANT, str(tmp_path / 'elsewhere' / 'c.png'): 'x'}, size=8))
    assert len(ds) == 2 and len(said) == 1 and "1 caption(s) name images not in real, e.g. '/" in said[0], said


# ---------------------------------------------------------------- finetune

def test_lora_targets_are_layer_names():
    from ipfacediff.finetune import FinetuneConfig
    assert FinetuneConfig(data='x', out='y', lora_targets='to_q').check().lora_targets == ('to_q',)
    assert FinetuneConfig(data='x', out='y', lora_targets=['to_k', 'to_v']).check().lora_targets == ('to_k', 'to_v')
    for bad in ((), ('to_q', ''), (1,)):
        one_line_error(lambda: FinetuneConfig(data='x', out='y', lora_targets=bad).check(), 'lora_targets must name UNet layers')
    msg = one_line_error(lambda: FinetuneConfig(mode='directional', data='x', out='y').check(), 'needs reference captions', '--captions')
    assert "caption_images('FACES', out='captions.jsonl')" in msg


def test_second_lora_run_and_unknown_targets_are_refused_before_anything_is_written(tmp_path):
    from ipfacediff.facedata import demo_faces
    from ipfacediff.finetune import FinetuneConfig, Finetuner
    from ipfacediff.models import tiny_components
    folder, caps = demo_faces(tmp_path / 'faces', size=64, n_video=0)
    cfg = lambda out, **kw: FinetuneConfig(mode='directional', data=str(folder), captions=str(caps), out=str(tmp_path / out), tiny=True,
                                           size=64, batch_size=2, inversion_steps=10, rank=4, steps=1, **kw)
    comps = tiny_components(0)
    Finetuner(cfg('r1'), comps=comps)
    one_line_error(lambda: Finetuner(cfg('r2'), comps=comps), 'already carries LoRA adapters', 'load_components / tiny_components')
    one_line_error(lambda: Finetuner(cfg('r3', lora_targets=('nope',)), comps=tiny_components(0)),
                   "lora_targets ('nope',) does not name layers of this UNet", 'to_q')
    assert not (tmp_path / 'r2').exists() and not (tmp_path / 'r3').exists()


# ---------------------------------------------------------------- pipeline: settings, frames, edit_video

def test_edit_config_wants_one_string_per_prompt_and_an_int_seed():
    from ipfacediff.pipeline import EditConfig
    one_line_error(lambda: EditConfig(['add glasses', 'add a hat']).validate(), 'prompt must be one string, got list', 'put every attribute in one prompt')
    one_line_error(lambda: EditConfig('add glasses', source_prompt=None).validate(), 'source_prompt must be one string, got NoneType None')
    msg = one_line_error(lambda: EditConfig('add glasses', negative_prompt=None).validate(), 'negative_prompt must be one string')
    assert 'put every attribute' not in msg
    one_line_error(lambda: EditConfig('  ').validate(), 'the prompt is empty')
    cfg = EditConfig('add glasses', seed=np.int64(3)).validate()
    assert cfg.seed == 3 and type(cfg.seed) is int


def test_raw_frames_of_two_sizes_or_no_pixels_are_one_line_errors(tc, tmp_path):
    from ipfacediff.pipeline import EditConfig, IPFaceDiffPipeline
    pipe = IPFaceDiffPipeline(tc, cache_dir=tmp_path / 'cache', progress=False, smoke=True)
    cfg = EditConfig('add glasses', size=64, steps=1, inversion_steps=1)
    f = np.zeros((2, 32, 48, 3), np.uint8)
    one_line_error(lambda: pipe.edit([f[0], f[1][:20]], cfg, fps=10), 'the frames differ in size')
    one_line_error(lambda: pipe.edit(f[:, :, :0], cfg, fps=10), 'the frames are empty (0×32 pixels)')


def test_edit_video_checks_before_loading_a_model(tmp_path):
    "With no pipeline given, SD would be loaded (offline: not cached); these are refused before that, naming the real cause."
    from ipfacediff.pipeline import edit_video
    f = np.zeros((2, 32, 32, 3), np.uint8)
    one_line_error(lambda: edit_video(f, 'add glasses'), 'edit_video(frames, prompt, fps=...)')
    one_line_error(lambda: edit_video(SAMPLE, ['add glasses', 'a hat']), 'prompt must be one string')


def test_edit_video_takes_raw_frames_at_their_rate_and_passes_overwrite_and_side_by_side(tc, tmp_path):
    "One real (tiny) edit of the sample's first frames given as an array, over an existing out=, with a side-by-side (dlib)."
    from ipfacediff.pipeline import IPFaceDiffPipeline, edit_video
    from ipfacediff.video import read_video
    frames, _ = read_video(SAMPLE, max_frames=2, progress=False)
    pipe = IPFaceDiffPipeline(tc, cache_dir=tmp_path / 'cache', progress=False, smoke=True)
    o, s = tmp_path / 'o.mp4', tmp_path / 's.mp4'
    o.write_bytes(b'mine'); s.write_bytes(b'mine too')
    one_line_error(lambda: edit_video(frames, 'add glasses', out=o, pipeline=pipe, fps=4, size=64, steps=1, inversion_steps=1), '--overwrite')
    r = edit_video(frames, 'add glasses', out=o, side_by_side=s, overwrite=True, pipeline=pipe, fps=4, size=64, steps=1, inversion_steps=1)
    back, info = read_video(o, progress=False)
    sbs, sinfo = read_video(s, progress=False)
    assert r.fps == 4 and info.fps == 4 and back.shape == frames.shape           # the frames' own rate, nothing resampled
    assert sbs.shape[0] == 2 and sbs.shape[2] == 2 * frames.shape[2] and sinfo.fps == 4


# ---------------------------------------------------------------- pipeline: inversion cache, shared UNet

def test_an_inversion_cache_file_that_does_not_fit_is_recomputed_with_a_warning(tc, tmp_path):
    from ipfacediff.ddim import ddim_timesteps
    from ipfacediff.pipeline import EditConfig, IPFaceDiffPipeline
    pipe = IPFaceDiffPipeline(tc, cache_dir=tmp_path / 'cache', progress=False, smoke=True)
    cfg = EditConfig('add glasses', size=64, steps=2, inversion_steps=4)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref, hit = pipe.invert(z0, cfg, key='k')
    assert not hit and pipe.invert(z0, cfg, key='k')[1]                     # written, then read back
    f = tmp_path / 'cache' / 'inversion' / 'k.pt'
    want = ddim_timesteps(cfg.steps)
    for bad in ({t: v for t, v in ref.items() if t != want[-1]},           # a step of this edit missing
                {t: v[..., :4] for t, v in ref.items()},                  # latents of another size
                torch.zeros(3)):                                         # not a trajectory at all
        torch.save(bad, f)
        (traj, hit), said = _said(lambda: pipe.invert(z0, cfg, key='k'))
        assert not hit and any('ignoring an inversion cache file that does not fit this edit' in m for m in said), said
        assert all(torch.equal(traj[t], ref[t]) for t in want)


def test_components_carrying_adapter_branches_belong_to_their_pipeline(tmp_path):
    from peft import LoraConfig, get_peft_model
    from ipfacediff.finetune import FinetuneConfig, Finetuner
    from ipfacediff.facedata import demo_faces
    from ipfacediff.models import tiny_components
    from ipfacediff.pipeline import IPFaceDiffPipeline
    for i, br in enumerate(('eps1', 'eps2')):
        torch.manual_seed(20 + i)
        get_peft_model(tiny_components(0).unet, LoraConfig(r=4, lora_alpha=4, target_modules=['to_q'], init_lora_weights=False)
                       ).save_pretrained(tmp_path / br)
    comps = tiny_components(0)
    pa = IPFaceDiffPipeline.from_components(comps, tmp_path / 'eps1', tmp_path / 'eps2', progress=False)
    assert pa.adapters is not None and pa.eps1 is comps.unet
    for build in (lambda: IPFaceDiffPipeline.from_components(comps, tmp_path / 'eps1', tmp_path / 'eps2', progress=False),
                  lambda: IPFaceDiffPipeline.from_components(comps, progress=False),
                  lambda: IPFaceDiffPipeline(comps, progress=False),
                  lambda: IPFaceDiffPipeline(tiny_components(0), eps1=comps.unet, progress=False),
                  lambda: IPFaceDiffPipeline(tiny_components(0), eps2=comps.unet, progress=False)):
        one_line_error(build, 'already carries LoRA adapters', 'load the components again')
    assert len(pa.adapters._handles) == 1 + len(pa.adapters.layers)        # hooked once, not twice
    folder, caps = demo_faces(tmp_path / 'faces', size=64, n_video=0)
    one_line_error(lambda: Finetuner(FinetuneConfig(mode='directional', data=str(folder), captions=str(caps), out=str(tmp_path / 'r'),
                                                    tiny=True, size=64, batch_size=2, inversion_steps=10, rank=4), comps=comps),
                   'already carries LoRA adapters')


# ---------------------------------------------------------------- injection, models, utils, embedders

def test_injection_schedule_takes_the_floor_of_tau_n_as_written():
    from ipfacediff.ddim import ddim_timesteps
    from ipfacediff.injection import injection_schedule
    for n, tau, k in ((50, 0.58, 29), (100, 0.29, 29), (100, 0.57, 57), (10, 0.55, 5), (10, 0.99, 9), (3, 1 / 3, 1), (4, 1.0, 4)):
        s = list(injection_schedule(ddim_timesteps(n), attn_t=tau, conv_t=tau).values())
        assert s == [(i < k, i < k) for i in range(n)], (n, tau)
    s = list(injection_schedule(ddim_timesteps(10), attn_t=0.3, conv_t=0.55).values())      # each window its own τ
    assert s == [(i < 3, i < 5) for i in range(10)]


def test_a_prompt_past_77_tokens_warns_naming_what_is_cut(tc):
    from ipfacediff.models import encode_prompt
    tok = tc.tokenizer
    fits = ' '.join(['a'] * 75)
    assert len(tok(fits).input_ids) == 77
    e, said = _said(lambda: encode_prompt(tc, fits))
    assert said == []                                                     # exactly what CLIP reads: nothing to say
    long = fits + ' sunglasses'
    n = len(tok(long).input_ids) - 2
    e2, said = _said(lambda: encode_prompt(tc, ['a face', long]))
    assert len(said) == 1 and f"the prompt is {n} tokens long and CLIP reads 75: 'sunglasses' at its end is left out" in said[0], said
    torch.testing.assert_close(e2[1], e[0])                               # what is read is the first 77 tokens
    very = fits + ' with big round red sunglasses and a wide brimmed straw hat on a sunny day'
    _, said = _said(lambda: encode_prompt(tc, very))
    cut = said[0].split(': ', 1)[1].split(' at its end')[0]          # where the cut falls, and how the prompt ends; not all of it
    assert cut.startswith("'with big round red sungl") and cut.endswith("on a sunny day'") and '…' in cut and 'brimmed' not in cut, said


def test_a_file_of_an_adapter_folder_as_a_branch_says_to_pass_the_folder(tc, tmp_path):
    from peft import LoraConfig, get_peft_model
    from ipfacediff.models import check_branch, load_branch, tiny_components
    get_peft_model(tiny_components(0).unet, LoraConfig(r=4, lora_alpha=4, target_modules=['to_q'])).save_pretrained(tmp_path / 'ad')
    load_branch(tmp_path / 'ad', tc.unet, 'identity model (ε1)'); check_branch(tmp_path / 'ad')     # the folder itself is a branch
    f = tmp_path / 'ad' / 'adapter_model.safetensors'
    assert f.is_file()
    one_line_error(lambda: check_branch(f, 'edit model (ε2)'), f'edit model (ε2) {f} is a file of the LoRA adapter folder', 'pass the folder')
    one_line_error(lambda: load_branch(f, tc.unet, 'identity model (ε1)'), 'is a file of the LoRA adapter folder', 'pass the folder')
    (tmp_path / 'lone').mkdir(); shutil.copy(f, tmp_path / 'lone' / f.name)   # a weights file on its own is not an adapter folder's file
    check_branch(tmp_path / 'lone' / f.name, 'edit model (ε2)')


def test_resolve_dtype_refuses_a_torch_dtype_that_is_not_floating_point():
    from ipfacediff.utils import resolve_dtype
    for dt in (torch.int8, torch.bool, torch.uint8):
        one_line_error(lambda: resolve_dtype(dt), 'is not a floating-point type', 'torch.float32')
    assert resolve_dtype(torch.float64) is torch.float64


def test_get_embedder_leaves_the_callers_rng_alone(tmp_path):
    from ipfacediff import embedders as E
    with torch.random.fork_rng(devices=[]):
        torch.save(E.IResNet(E.IRESNET_LAYERS['r18']).state_dict(), tmp_path / 'b.pth')
    torch.manual_seed(5)
    before = torch.get_rng_state()
    E.get_embedder('arcface', weights=tmp_path / 'b.pth')
    assert torch.equal(torch.get_rng_state(), before)
