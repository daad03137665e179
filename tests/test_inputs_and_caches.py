"""Inputs that used to pass silently or crash, and caches keyed by the wrong thing: 16-bit greyscale images are scaled,
not clipped white; BLIP-2 captions do not start with the prompt; FaceDataset iteration ends; recognizers whose weights
change get new cached embeddings; bad recognizer files are one-line errors; evaluate finds small faces in big frames;
identity fine-tuning refuses an embedder that passes no gradient. Offline, tiny or shipped models."""
import copy, itertools, warnings
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from shared import one_line_error

torch.set_num_threads(1)


def grey16(path):
    "A 16-bit greyscale ramp (0 … 65535 across 256 columns) saved as PNG."
    Image.fromarray(np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(16, 0)).save(path)
    return path


def test_16bit_greyscale_is_scaled_by_every_reader(tmp_path):
    from ipfacediff.facedata import load_image
    from ipfacediff.metrics import load_media
    f = grey16(tmp_path / 'g16.png')
    x = load_image(f)
    assert abs(float(x.mean()) - 0.5) < 0.01 and float((x == 1).float().mean()) < 0.01      # not clipped to white
    m = load_media(f)
    assert m.shape == (1, 16, 256, 3) and m.dtype == np.uint8
    assert np.array_equal(m[0, 0, :, 0], np.arange(256))


def tiny_blip2(folder):
    "A randomly initialised tiny BLIP-2 (OPT language model: decoder-only) with the shipped tokenizer, saved to `folder`."
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig, Blip2VisionConfig,
                              BlipImageProcessor, OPTConfig)
    from ipfacediff.models import tiny_tokenizer
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={'height': 32, 'width': 32}), tokenizer=tiny_tokenizer(), num_query_tokens=4)
    tok = proc.tokenizer
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        qformer_config=Blip2QFormerConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          encoder_hidden_size=16, vocab_size=len(tok)),
        text_config=OPTConfig(vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                              word_embed_proj_dim=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids('<image>'))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Blip2ForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def test_caption_does_not_repeat_the_prompt(tmp_path):
    from ipfacediff.facedata import caption_images
    model = tiny_blip2(tmp_path / 'blip')
    (tmp_path / 'imgs').mkdir()
    Image.new('RGB', (40, 40), (200, 100, 50)).save(tmp_path / 'imgs' / 'a.png')
    grey16(tmp_path / 'imgs' / 'b.png')
    prompt = 'question : describe the face . answer :'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        caps = caption_images(tmp_path / 'imgs', model=str(model), device='cpu', dtype='float32', prompt=prompt,
                              max_new_tokens=4, progress=False)
    assert sorted(caps) == ['a.png', 'b.png']
    for c in caps.values(): assert 'describe the face' not in c, c


def test_face_dataset_iteration_ends(tmp_path):
    from ipfacediff.facedata import FaceDataset
    for n in 'ab': Image.new('RGB', (32, 32), (10, 20, 30)).save(tmp_path / f'{n}.png')
    ds = FaceDataset(tmp_path, size=16, quiet=True)
    assert [x['path'] for x in itertools.islice(ds, 5)] == ['a.png', 'b.png']   # capped: a regression fails, not hangs
    assert ds[-2]['path'] == 'a.png'
    with pytest.raises(IndexError): ds[2]


# recognizers: cache keys and bad files

class Scaled(torch.nn.Module):
    "A stand-in recogniser subclassing nothing of ours: a fixed random projection of a 16² thumbnail."
    name = 'same-name'
    def __init__(self, seed):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.proj = torch.nn.Linear(3 * 16 * 16, 8)
    def forward(self, x):
        return torch.nn.functional.normalize(self.proj(torch.nn.functional.interpolate(x, size=16, mode='area').flatten(1)), dim=-1)


def test_embedding_cache_is_keyed_by_weights_not_name(tmp_path):
    from skimage.data import astronaut
    from ipfacediff.embedders import get_embedder
    from ipfacediff.metrics import EmbedStats, embed_media
    f = tmp_path / 'astro.png'
    Image.fromarray(astronaut()).save(f)
    out = {}
    for seed in (0, 1, 0):
        st = EmbedStats()
        out.setdefault(seed, []).append(embed_media(f, {'r': Scaled(seed)}, tmp_path / 'cache', size=128, stats=st)['r'].frames)
        assert (st.computed, st.cached) == ((0, 1) if len(out[seed]) == 2 else (1, 0)), (seed, st)
    assert not np.allclose(out[0][0], out[1][0]) and np.array_equal(out[0][0], out[0][1])
    # ours: the same name, another weight → another fingerprint; the same weights → the same one
    a, b = get_embedder('dlib'), get_embedder('dlib')
    assert a.fingerprint() == b.fingerprint()
    c = copy.deepcopy(a); c._fingerprint = None
    with torch.no_grad(): next(c.parameters()).view(-1)[0] += 1e-3
    assert c.fingerprint() != a.fingerprint()


@pytest.mark.parametrize('kind,content,parts', [
    ('arcface', b'not a checkpoint', ('not a state dict torch can read safely', 'backbone')),
    ('cosface', b'garbage', ('is not a TorchScript model',)),
])
def test_bad_recognizer_file_is_one_line(tmp_path, kind, content, parts):
    from ipfacediff.embedders import get_embedder
    f = tmp_path / ('w.pth' if kind == 'arcface' else 'w.pt')
    f.write_bytes(content)
    one_line_error(lambda: get_embedder(f'{kind}={f}'), *parts)


def test_pickled_model_is_refused_as_arcface_weights(tmp_path):
    from ipfacediff.embedders import get_embedder
    torch.save(torch.nn.Linear(2, 2), tmp_path / 'model.pth')
    one_line_error(lambda: get_embedder(f'arcface={tmp_path / "model.pth"}'), 'not a pickled model')


def test_torchscript_recognizer_of_wrong_input_is_one_line(tmp_path):
    from ipfacediff.embedders import get_embedder
    torch.jit.script(torch.nn.Linear(5, 3)).save(tmp_path / 'lin.pt')
    one_line_error(lambda: get_embedder(f'facenet={tmp_path / "lin.pt"}'), 'does not take a (1, 3, 160, 160) face')


def test_embedders_refuse_0_to_255_floats():
    from ipfacediff.embedders import get_embedder
    one_line_error(lambda: get_embedder('dlib')(torch.full((1, 3, 64, 64), 200.)), 'divide 0..255 frames by 255')


def test_face_crops_finds_a_small_face_in_a_big_frame():
    "A ~110 px face in a 2400² frame is too small at the 1024 px the detector first looks at; evaluate retries at full size as edit does."
    from skimage.data import astronaut
    from ipfacediff.metrics import face_crops
    big = np.zeros((1, 2400, 2400, 3), np.uint8)
    big[0, 900:1412, 900:1412] = astronaut()
    crops, det, boxes = face_crops(big, size=128)
    assert det.all() and crops.shape == (1, 128, 128, 3)
    x0, y0, x1, y1 = boxes[0]
    assert 900 < x0 < x1 < 1412 and 900 < y0 < y1 < 1412


def test_identity_finetuning_refuses_an_embedder_without_gradient():
    from ipfacediff.finetune import get_f_arc
    from ipfacediff.losses import identity_loss
    one_line_error(lambda: get_f_arc('dlib-native'), 'passes no gradient', '--embedder dlib')
    y0 = torch.rand(1, 3, 64, 64)
    x = y0.clone().requires_grad_()
    one_line_error(lambda: identity_loss(x, y0, lambda y: y.detach().flatten(1)[:, :8]), 'passes no gradient')


def test_clip_folder_without_tokenizer_files_is_refused(tmp_path):
    from ipfacediff.losses import load_clip, tiny_clip
    clip = tiny_clip()
    clip.model.save_pretrained(tmp_path / 'clip')                  # weights and config, no tokenizer files
    one_line_error(lambda: load_clip(str(tmp_path / 'clip')), 'lacks the tokenizer files')
    clip.tokenizer.save_pretrained(tmp_path / 'clip')
    assert load_clip(str(tmp_path / 'clip')).tokenizer('a face').input_ids == clip.tokenizer('a face').input_ids


# the pipeline with raw frames, and settings checked before the work

FEW = dict(size=64, steps=1, inversion_steps=1, batch_size=4)


@pytest.fixture(scope='module')
def pipe(tmp_path_factory):
    from ipfacediff.pipeline import IPFaceDiffPipeline
    return IPFaceDiffPipeline.tiny(0, cache_dir=tmp_path_factory.mktemp('cache'), progress=False)


@pytest.fixture(scope='module')
def sample():
    from ipfacediff.utils import data_path
    from ipfacediff.video import read_video
    frames, info = read_video(data_path('sample.mp4'), max_frames=12, progress=False)
    return frames, info.fps


def test_raw_frames_are_resampled_to_the_asked_fps(pipe, sample):
    from ipfacediff.pipeline import EditConfig
    from ipfacediff.video import resample_indices
    frames, fps = sample
    r = pipe.edit(frames, EditConfig('add glasses', **FEW, fps=fps / 3, max_frames=3), fps=fps)
    assert r.fps == pytest.approx(fps / 3) and len(r.frames) == 3 and r.crops.shape[0] == 3
    kept = resample_indices(len(frames), fps, fps / 3)[:3]
    assert kept.tolist() == [0, 3, 6]
    # each output frame is nearest to its kept input frame (the edit changes only the face; the corners alone are the same in every frame)
    dist = np.abs(r.frames[:, None].astype(np.int16) - frames[None].astype(np.int16)).mean((2, 3, 4))
    assert dist.argmin(1).tolist() == kept.tolist()


@pytest.mark.parametrize('frames_of,fps,parts', [
    (lambda f: np.concatenate([f, f[..., :1]], -1), None, ('uint8 RGB (N, H, W, 3)',)),
    (lambda f: f, -5.0, ('fps must be a finite number above 0',)),
    (lambda f: f, float('nan'), ('fps must be a finite number above 0',)),
])
def test_bad_raw_frames_are_refused_before_any_unet_call(pipe, sample, frames_of, fps, parts):
    from ipfacediff.pipeline import EditConfig
    frames, src_fps = sample
    one_line_error(lambda: pipe.edit(frames_of(frames[:2]), EditConfig('add glasses', **FEW), fps=src_fps if fps is None else fps), *parts)
    assert sum(pipe.calls.values()) == 0


@pytest.mark.parametrize('seed', [-1, 2**63, 2**64, 1.5, True])
def test_seed_out_of_range_is_refused(seed):
    from ipfacediff.pipeline import EditConfig
    one_line_error(lambda: EditConfig('add glasses', seed=seed).validate(), '--seed must be a whole number')


def test_inversion_holds_only_the_kept_steps(pipe, sample):
    "A 20-step inversion for 1 editing step keeps one z_t per batch, not twenty (memory does not grow with --inversion-steps)."
    import ipfacediff.pipeline as P
    from ipfacediff.pipeline import EditConfig
    frames, fps = sample
    seen, real = [], P.ddim_invert
    def spy(*a, **k):
        out = real(*a, **k); seen.append(len(out)); return out
    P.ddim_invert = spy
    try: pipe.edit(frames[:2], EditConfig('add glasses', **{**FEW, 'inversion_steps': 20}, seed=3), fps=fps)
    finally: P.ddim_invert = real
    assert seen == [1]


def test_crop_pixels_round_trip_exactly():
    "Every 8-bit level survives uint8 → [-1, 1] → uint8 (the VAE's range and back): rounding, not truncation (½ level darker)."
    from ipfacediff.pipeline import _to_unit, _to_uint8
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None, None], (1, 256, 1, 3)).copy()
    assert np.array_equal(_to_uint8(_to_unit(levels)), levels)
