"""Invariants of models / embedders / utils that no other test pinned down (mutation review round 4: each test
fails on at least one code change that the rest of tests/ let through). Tiny random models, offline, one core."""
import copy, json, os, random, shutil, stat, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared import one_line_error
from ipfacediff import embedders as E
from ipfacediff.models import (check_branch, check_scheduler, encode_prompt, load_branch, load_components,
                               make_scheduler, save_components, tiny_components, vae_decode, vae_encode)
from ipfacediff.utils import (UserError, atomic_dir, atomic_output, check_report_folder, check_seed, check_writable, cpu_workers, data_path, inside,
                              resolve_device, resolve_dtype, rgb_image, seed_everything, seeded, usable_cache_dir, weights_fingerprint)

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def tc():
    return tiny_components()


@pytest.fixture(scope='module')
def saved(tc, tmp_path_factory):
    "The tiny components saved in diffusers' layout (a --model folder)."
    return save_components(tc, tmp_path_factory.mktemp('sd') / 'tiny')


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p): return stat.S_IMODE(os.stat(p).st_mode)


# ================================================================ utils

def test_user_error_message_is_one_line():
    "A UserError's text is one line whatever its message held (the CLI prints it after `ipfacediff: error:`)."
    assert str(UserError('bad thing\n   happened\there')) == 'bad thing happened here'


def test_data_path_of_a_missing_asset_is_a_user_error():
    "A shipped asset that is missing is named in a UserError, not returned as a path that fails later."
    assert data_path('tokenizer').is_dir()
    one_line_error(lambda: data_path('no-such-asset.bin'), 'no-such-asset.bin', 'reinstall')


@pytest.mark.skipif(not Path('/proc/self').is_dir(), reason='needs Linux /proc')
def test_check_writable_really_writes():
    "A folder where no file can be made (here /proc, which even root cannot write to) is refused before the work, not at the final rename."
    one_line_error(lambda: check_writable(Path('/proc'), '--out'), 'cannot write to the folder /proc', '--out')


def test_atomic_output_gets_the_users_file_mode(tmp_path, umask022):
    "Outputs are written with the user's umask (0644 here), not mkstemp's private 0600."
    with atomic_output(tmp_path / 'out.mp4') as tmp: tmp.write_bytes(b'x')
    assert (tmp_path / 'out.mp4').read_bytes() == b'x' and _mode(tmp_path / 'out.mp4') == 0o644


def test_atomic_output_over_a_folder_is_refused_even_with_overwrite(tmp_path):
    "A file output whose path is a folder is refused (--overwrite would not help) and the folder is left as it was."
    (tmp_path / 'clip.mp4').mkdir(); (tmp_path / 'clip.mp4' / 'keep').write_text('k')
    def write():
        with atomic_output(tmp_path / 'clip.mp4', overwrite=True) as tmp: tmp.write_bytes(b'x')
    one_line_error(write, 'is a folder', 'file path')
    assert (tmp_path / 'clip.mp4' / 'keep').read_text() == 'k'


def test_atomic_dir_replaces_cleanly_with_the_users_mode(tmp_path, umask022):
    "--overwrite of an output folder leaves only the new folder (mode 0755 here): no `.old`/`.partial` siblings, no old files."
    out = tmp_path / 'report'
    out.mkdir(); (out / 'old.txt').write_text('old')
    with atomic_dir(out, overwrite=True) as tmp: (tmp / 'new.txt').write_text('new')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['report']
    assert sorted(p.name for p in out.iterdir()) == ['new.txt'] and _mode(out) == 0o755


def test_atomic_dir_failure_leaves_the_old_folder_and_no_partial(tmp_path):
    "A run that fails half-way leaves the earlier output folder as it was and no temporary folder beside it."
    out = tmp_path / 'report'
    out.mkdir(); (out / 'old.txt').write_text('old')
    with pytest.raises(RuntimeError, match='crash'):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / 'new.txt').write_text('new'); raise RuntimeError('crash')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['report'] and sorted(p.name for p in out.iterdir()) == ['old.txt']


def test_atomic_dir_over_a_file_is_refused_even_with_overwrite(tmp_path):
    "A folder output whose path is a file is refused, and the file is kept."
    (tmp_path / 'report').write_text('keep')
    def write():
        with atomic_dir(tmp_path / 'report', overwrite=True) as tmp: (tmp / 'a').write_text('a')
    one_line_error(write, 'is a file', 'folder path')
    assert (tmp_path / 'report').read_text() == 'keep'


def test_usable_cache_dir_checks_without_making_when_told(tmp_path):
    "create=False only checks the cache folder (nothing is made); a path under a file is refused."
    assert usable_cache_dir(tmp_path / 'a' / 'b', create=False) == tmp_path / 'a' / 'b'
    assert not (tmp_path / 'a').exists()
    assert usable_cache_dir(tmp_path / 'a' / 'b').is_dir()
    (tmp_path / 'f').write_text('x')
    one_line_error(lambda: usable_cache_dir(tmp_path / 'f' / 'sub'), 'is a file (or lies under one)')


def test_inside_is_one_way_and_resolves_dotdot_and_links(tmp_path):
    "`inside(path, folder)`: under it, not above it; `..` and links are followed to where they really are."
    a = tmp_path / 'a'; (a / 'b').mkdir(parents=True); (tmp_path / 'c').mkdir()
    assert inside(a / 'b' / 'x.mp4', a) and inside(a, a)
    assert not inside(a, a / 'b')
    assert not inside(a / '..' / 'c', a)
    (tmp_path / 'link').symlink_to(a / 'b')
    assert inside(tmp_path / 'link' / 'x.mp4', a)


def test_report_folder_that_is_not_a_report_is_never_replaced(tmp_path):
    "--out a non-empty folder without the report's marker is refused even with --overwrite; one with the marker may be replaced."
    out = tmp_path / 'home'; out.mkdir(); (out / 'thesis.tex').write_text('precious')
    one_line_error(lambda: check_report_folder(out, True, 'report.json', 'report'), 'not empty', 'holds no report')
    (out / 'report.json').write_text('{}')
    assert check_report_folder(out, True, 'report.json', 'report') == out


def test_report_folder_inside_an_input_folder_is_refused(tmp_path):
    "An --out inside a folder whose files are inputs is refused: the report would be read as an input next time."
    vids = tmp_path / 'videos'; vids.mkdir()
    one_line_error(lambda: check_report_folder(vids / 'rep', False, 'report.json', 'report', listed=[vids]), 'lies inside the input folder')
    assert check_report_folder(tmp_path / 'rep', False, 'report.json', 'report', listed=[vids]) == tmp_path / 'rep'


def test_check_seed_range_and_types():
    "Seeds are whole numbers 0 … 2³²−1 (NumPy ints too); 2³², negatives and booleans are refused."
    assert check_seed(2**32 - 1) == 2**32 - 1
    s = check_seed(np.int64(7)); assert s == 7 and type(s) is int
    for bad in (2**32, -1, True, 1.5):
        one_line_error(lambda: check_seed(bad), '--seed must be a whole number')


def test_cpu_workers_refuses_zero():
    "workers=0 is refused (a pool of 0 threads would hang or fail), a positive count is kept."
    assert cpu_workers(3) == 3 and cpu_workers() >= 1
    one_line_error(lambda: cpu_workers(0), 'at least 1')


def test_16bit_greyscale_is_scaled_from_16_bits_even_when_dark():
    "A 16-bit greyscale image is scaled by 255/65535 whatever its brightest pixel (a dark frame must stay dark, not jump to 8-bit levels)."
    a = np.array([[0, 255, 32896, 65535]], np.uint16)
    got = np.asarray(rgb_image(Image.fromarray(a)))[..., 0]
    assert got.tolist() == [[0, 1, 128, 255]]
    dark = np.asarray(rgb_image(Image.fromarray(np.array([[0, 100, 255]], np.uint16))))[..., 0]
    assert dark.tolist() == [[0, 0, 1]]


def test_resolve_device_refuses_unsupported_devices():
    "Only auto, cpu and cuda[:N] are accepted; another torch device type (meta) is a UserError."
    assert resolve_device('cpu') == torch.device('cpu')
    one_line_error(lambda: resolve_device('meta'), "'meta' is not supported")


def test_resolve_dtype_names_and_auto():
    "Every spelled-out dtype maps to its torch dtype, a torch.dtype passes through, `auto` is float16 on CUDA and float32 on CPU."
    want = {'float32': torch.float32, 'fp32': torch.float32, 'float16': torch.float16, 'fp16': torch.float16, 'half': torch.float16,
            'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16}
    assert {k: resolve_dtype(k) for k in want} == want
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16 and resolve_dtype(torch.float16, 'cpu') is torch.float16
    assert resolve_dtype('auto', 'cpu') == torch.float32 and resolve_dtype(None, 'cuda') == torch.float16
    one_line_error(lambda: resolve_dtype('int8'), "unknown dtype 'int8'")


def test_seed_everything_seeds_all_rngs_and_its_generator():
    "seed_everything(s) makes Python, NumPy, torch and the returned generator repeat their draws."
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            draws = []
            for s in (7, 7, 8):
                g = seed_everything(s)
                draws.append((random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=g))))
    finally:
        random.setstate(py); np.random.set_state(npy)
    assert draws[0] == draws[1] and all(a != b for a, b in zip(draws[0], draws[2]))


def test_seeded_repeats_inside_and_restores_outside():
    "Inside `seeded(s)` torch's draws depend on s alone; after it the caller's RNG continues as if nothing happened."
    with torch.random.fork_rng():
        torch.manual_seed(123); ref = torch.rand(4)
        torch.manual_seed(123)
        with seeded(5): a = torch.rand(3)
        with seeded(5): b = torch.rand(3)
        assert torch.equal(a, b) and torch.equal(torch.rand(4), ref)


def test_weights_fingerprint_skips_and_sees_through_lora_wrapping(tc):
    "A UNet with LoRA layers whose LoRA weights are skipped hashes like the plain UNet (inversion cache shared with the base); skip is honoured."
    from peft import LoraConfig
    plain = weights_fingerprint(tc.unet)
    u = copy.deepcopy(tc.unet)
    u.add_adapter(LoraConfig(r=2, target_modules=['to_q'], init_lora_weights=False))
    assert any('.base_layer.' in n for n in u.state_dict())
    assert weights_fingerprint(u, skip=lambda n: '.lora_' in n) == plain
    assert weights_fingerprint(u) != plain


def test_weights_fingerprint_sees_the_dtype():
    "The same zero bytes in float16 and bfloat16 are different weights: the fingerprint (a cache key) differs."
    lin = torch.nn.Linear(4, 4, bias=False); torch.nn.init.zeros_(lin.weight)
    assert weights_fingerprint(copy.deepcopy(lin).half()) != weights_fingerprint(copy.deepcopy(lin).bfloat16())


# ================================================================ models

def test_make_scheduler_is_sd21s_ddim_and_takes_overrides():
    "SD 2.1-base's DDIM: 50 steps run 981 … 1 ('leading', offset 1), ᾱ_999 ≈ 0.0047 (scaled-linear 0.00085–0.012), final ᾱ = ᾱ_0; overrides win."
    s = make_scheduler(); s.set_timesteps(50)
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1 and len(s.timesteps) == 50
    assert abs(float(s.alphas_cumprod[-1]) - 0.004660) < 1e-5 and abs(float(s.alphas_cumprod[0]) - 0.99915) < 1e-5
    assert float(s.final_alpha_cumprod) == float(s.alphas_cumprod[0])
    assert make_scheduler(steps_offset=0).config.steps_offset == 0 and make_scheduler(beta_end=0.02).config.beta_end == 0.02


def test_tiny_components_are_frozen_deterministic_and_leave_the_rng(tc):
    "tiny_components(seed): eval mode, no gradients, the same weights for the same seed, other ones for another, caller's RNG untouched."
    assert not any(p.requires_grad for m in (tc.unet, tc.vae, tc.text_encoder) for p in m.parameters())
    assert not any(m.training for m in (tc.unet, tc.vae, tc.text_encoder))
    with torch.random.fork_rng():
        torch.manual_seed(0); ref = torch.rand(3)
        torch.manual_seed(0); again = tiny_components(0)
        assert torch.equal(torch.rand(3), ref)
    fp = lambda c: weights_fingerprint(c.unet, c.vae, c.text_encoder)
    assert fp(again) == fp(tc) != fp(tiny_components(1))


def test_vae_scale_matches_the_latents(tc):
    "`vae_scale` is the VAE's real downsampling: a 64² image gives 64/vae_scale latents (8 for 4 blocks)."
    z = vae_encode(tc.vae, torch.zeros(1, 3, 64, 64))
    assert tc.vae_scale == 8 and z.shape == (1, 4, 8, 8)


def test_components_to_casts_all_three_networks(tc):
    "SDComponents.to(dtype=…) casts the UNet, VAE and text encoder (prompt embeddings come out in that dtype)."
    c = copy.copy(tc)
    c.unet, c.vae, c.text_encoder = (copy.deepcopy(m) for m in (tc.unet, tc.vae, tc.text_encoder))
    c.to(dtype=torch.bfloat16)
    assert {p.dtype for m in (c.unet, c.vae, c.text_encoder) for p in m.parameters()} == {torch.bfloat16} and c.dtype == torch.bfloat16


def test_encode_prompt_shapes(tc):
    "A string is one prompt; every prompt is padded (or cut) to 77 tokens, so a long prompt works and a batch has one shape."
    assert encode_prompt(tc, 'a face').shape == (1, 77, 32)
    long = ' '.join(['a very long prompt with a beard'] * 30)
    c = encode_prompt(tc, ['a', long])
    assert c.shape == (2, 77, 32)
    torch.testing.assert_close(c[:1], encode_prompt(tc, ['a']), atol=1e-6, rtol=0)


def test_vae_encode_decode_use_the_scaled_posterior_mean(tc):
    "z0 = s·mean(E(y)) (deterministic, scaled by the VAE's factor) and vae_decode divides it back out."
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        z, z2 = vae_encode(tc.vae, y), vae_encode(tc.vae, y)
        mean = tc.vae.encode(y).latent_dist.mean
        assert torch.equal(z, z2)
        torch.testing.assert_close(z, mean * 0.18215, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(vae_decode(tc.vae, z), tc.vae.decode(mean).sample, atol=1e-5, rtol=1e-5)


def test_check_scheduler_refuses_other_diffusions():
    "v-prediction models and schedules not trained with 1000 steps are refused (the DDIM code assumes ε and 1000)."
    check_scheduler(make_scheduler())
    one_line_error(lambda: check_scheduler(make_scheduler(prediction_type='v_prediction'), 'm'), "predicts 'v_prediction'")
    one_line_error(lambda: check_scheduler(make_scheduler(num_train_timesteps=500), 'm'), 'trained with 500 timesteps')


def test_load_components_reads_the_saved_scheduler_and_dtype(tc, tmp_path):
    "A model folder's own scheduler config is the one used (and a v-prediction one is refused); dtype= applies to all three networks."
    c = copy.copy(tc); c.scheduler = make_scheduler(beta_end=0.02)
    save_components(c, tmp_path / 'sd')
    got = load_components(tmp_path / 'sd', dtype='bfloat16')
    assert got.scheduler.config.beta_end == 0.02
    assert {p.dtype for m in (got.unet, got.vae, got.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    c.scheduler = make_scheduler(prediction_type='v_prediction')
    save_components(c, tmp_path / 'v')
    one_line_error(lambda: load_components(tmp_path / 'v'), "predicts 'v_prediction'")


def test_load_components_refuses_a_vae_of_other_latents(tc, saved, tmp_path):
    "A VAE whose latent_channels differ from the UNet's in_channels is refused by name."
    from diffusers import AutoencoderKL
    shutil.copytree(saved, tmp_path / 'sd'); shutil.rmtree(tmp_path / 'sd' / 'vae')
    cfg = {k: v for k, v in tc.vae.config.items() if not k.startswith('_')}
    AutoencoderKL.from_config({**cfg, 'latent_channels': 8}).save_pretrained(tmp_path / 'sd' / 'vae')
    one_line_error(lambda: load_components(tmp_path / 'sd'), 'latent_channels 8', 'in_channels 4')


def _variant(tc, **cfg):
    from diffusers import UNet2DConditionModel
    base = {k: v for k, v in tc.unet.config.items() if not k.startswith('_')}
    with torch.random.fork_rng(): return UNet2DConditionModel.from_config({**base, **cfg})


@pytest.mark.parametrize('cfg,key', [
    (dict(attention_head_dim=4), 'num_attention_heads'),       # tiny: heads given as attention_head_dim (diffusers' fallback)
    (dict(layers_per_block=1), 'layers_per_block'),
    (dict(down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D')), 'down_block_types'),
])
def test_branch_with_other_layout_is_refused(tc, tmp_path, cfg, key):
    "A branch UNet whose heads, layers per block or block types differ cannot be paired layer by layer with the base: refused by key."
    _variant(tc, **cfg).save_pretrained(tmp_path / 'u')
    one_line_error(lambda: load_branch(tmp_path / 'u', tc.unet, 'ε2'), f'its {key} is')


def test_base_names_the_base_unet(tc):
    "`base` (as `None` and '') means the base UNet itself, for load_branch and check_branch."
    assert load_branch('base', tc.unet) is tc.unet and load_branch(None, tc.unet) is tc.unet
    check_branch('base'); check_branch(None)


def test_peft_adapter_missing_weights_is_refused(tc, tmp_path):
    "A peft adapter whose file lacks some of its layers' weights is refused (peft would leave those layers at the base silently)."
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    get_peft_model(copy.deepcopy(tc.unet), LoraConfig(r=2, target_modules=['to_q', 'to_v'], init_lora_weights=False)).save_pretrained(tmp_path / 'l')
    f = tmp_path / 'l' / 'adapter_model.safetensors'
    save_file({k: v for k, v in load_file(str(f)).items() if 'to_v' not in k}, str(f))
    one_line_error(lambda: load_branch(tmp_path / 'l', tc.unet, 'ε2'), 'does not fit this UNet', 'to_v')


def test_unfinished_run_points_to_its_latest_checkpoint(tc, tmp_path):
    "A stopped fine-tuning run given as a branch: one line naming --resume and its latest checkpoint (not the first)."
    run = tmp_path / 'run'
    run.mkdir(); (run / 'config.json').write_text(json.dumps({'mode': 'identity', 'lambda1': 1.0}))
    for s in ('step_000010', 'step_000020'):
        (run / 'checkpoints' / s).mkdir(parents=True); (run / 'checkpoints' / s / 'adapter_config.json').write_text('{}')
    for f in (lambda: check_branch(run, 'ε1'), lambda: load_branch(run, tc.unet, 'ε1')):
        one_line_error(f, 'ε1', '--resume', f"pass its checkpoint {run / 'checkpoints' / 'step_000020'}")


def test_check_branch_refuses_a_missing_path_now(tmp_path):
    "check_branch refuses a branch path that does not exist before any work."
    one_line_error(lambda: check_branch(tmp_path / 'nope', '--edit-model'), '--edit-model', 'does not exist')


# ================================================================ embedders

def _ramp(n=512, off=100.):
    "A (1, 3, n, n) image: channel 0 = pixel x + off, channel 1 = pixel y + off (bilinear sampling returns coordinates)."
    x = torch.arange(n, dtype=torch.float64) + off
    return torch.stack([x.expand(n, n), x[:, None].expand(n, n), torch.zeros(n, n, dtype=torch.float64)])[None]


@pytest.mark.parametrize('frame', [512, 1024])
def test_aligned_crop_samples_where_to_frame_says(frame):
    "An AlignedCrop samples the aligned face exactly at `to_frame` of each crop pixel (x, y order, pixel centres, any frame size)."
    crop = E.AlignedCrop(12, 3.0, (200.0, 310.0))
    out = crop(_ramp(frame))[0].numpy()
    uv = np.stack(np.meshgrid(np.arange(12), np.arange(12)), -1).reshape(-1, 2)
    xy = crop.to_frame(uv, frame)
    np.testing.assert_allclose(out[0].reshape(-1), xy[:, 0] + 100, atol=1e-6)
    np.testing.assert_allclose(out[1].reshape(-1), xy[:, 1] + 100, atol=1e-6)
    assert abs(xy[:, 0].mean() - ((200 + 0.5) * frame / 512 - 0.5)) < 1e-9       # the crop's centre is `centre` in 512² units


def test_aligned_crop_repeats_the_border_outside_the_face():
    "Crop pixels that fall outside the aligned face take the nearest border pixel (not black)."
    out = E.AlignedCrop(8, 16.0, (20.0, 255.5))(_ramp(512, off=100.))
    assert float(out[0, 0].min()) == 100.0


def test_check_faces_promotes_one_image_and_refuses_bad_input():
    "One (3, H, H) face is a batch of 1; numpy arrays, non-RGB channels and 0..255 floats are one-line UserErrors."
    assert E.check_faces(torch.rand(3, 16, 16)).shape == (1, 3, 16, 16)
    one_line_error(lambda: E.check_faces(np.zeros((1, 3, 16, 16), np.float32)), 'torch tensor')
    one_line_error(lambda: E.check_faces(torch.rand(1, 4, 16, 16)), 'square FFHQ-aligned RGB')
    one_line_error(lambda: E.check_faces(torch.rand(1, 3, 16, 16) * 255), 'divide 0..255 frames by 255')


@pytest.fixture(scope='module')
def channel_means(tmp_path_factory):
    "A TorchScript 'recogniser' returning its input's per-channel mean: embed() shows the preprocessing."
    class Means(torch.nn.Module):
        def forward(self, x): return x.mean((2, 3))
    p = tmp_path_factory.mktemp('ts') / 'means.pt'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.jit.script(Means()).save(str(p))
    return p


def _flat(rgb, n=64):
    return torch.tensor(rgb, dtype=torch.float32)[None, :, None, None].expand(1, 3, n, n).contiguous()


def test_table1_presets_preprocess_as_their_networks_expect(channel_means):
    "vggface: BGR, minus its per-channel means, std 1; facenet: RGB (255·x − 127.5)/128; an explicit bgr= overrides the preset."
    x = _flat((0.2, 0.4, 0.8))
    with torch.no_grad():
        v = E.get_embedder('vggface', weights=channel_means)
        torch.testing.assert_close(v.embed(x)[0], torch.tensor([0.8 * 255 - 93.594, 0.4 * 255 - 104.7624, 0.2 * 255 - 129.1863]), atol=1e-3, rtol=0)
        f = E.get_embedder('facenet', weights=channel_means)
        torch.testing.assert_close(f.embed(x)[0], (torch.tensor([0.2, 0.4, 0.8]) * 255 - 127.5) / 128, atol=1e-4, rtol=0)
        r = E.get_embedder('vggface', weights=channel_means, bgr=False)
        torch.testing.assert_close(r.embed(x)[0], torch.tensor([0.2 * 255 - 93.594, 0.4 * 255 - 104.7624, 0.8 * 255 - 129.1863]), atol=1e-3, rtol=0)


def test_recogniser_options_and_names(channel_means):
    "Unknown options are refused, names are case/underscore-insensitive with NAME=PATH, a bad keyword is a UserError."
    one_line_error(lambda: E.get_embedder('facenet', weights=channel_means, colour='bgr'), 'unknown option(s) for facenet: colour')
    assert E.get_embedder(f'FaceNet={channel_means}').name == 'facenet'
    one_line_error(lambda: E.get_embedder('dlib', bogus=1), 'bad option for the dlib embedder')


def test_fingerprint_follows_channel_order(channel_means):
    "The same TorchScript file read as RGB or as BGR gives other vectors: the cache key differs."
    crop = E.PRESETS['facenet'].crop
    a, b = (E.TorchScriptEmbedder(channel_means, crop, bgr=bgr) for bgr in (False, True))
    assert a.fingerprint() != b.fingerprint()


def test_dlib_native_fingerprint_follows_jitters():
    "dlib-native with num_jitters=1 gives other vectors than without: the cache key differs."
    pytest.importorskip('dlib')
    assert E.DlibNativeEmbedder(num_jitters=0).fingerprint() != E.DlibNativeEmbedder(num_jitters=1).fingerprint()


def _small_iresnet(features=64):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = E.IResNet((1, 1, 1, 1), features)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1); m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_arcface_checkpoint_spellings_load_the_same(tmp_path):
    "DataParallel ('module.' names) and {'state_dict': …} checkpoints load like a plain backbone.pth; dim follows the checkpoint."
    net = _small_iresnet()
    sd = net.state_dict()
    torch.save(sd, tmp_path / 'plain.pth')
    torch.save({f'module.{k}': v for k, v in sd.items()}, tmp_path / 'dp.pth')
    torch.save({'state_dict': sd}, tmp_path / 'wrapped.pth')
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = E.get_embedder('arcface', weights=tmp_path / 'plain.pth')
        assert ref.dim == 64
        want = ref(x)
        for f in ('dp.pth', 'wrapped.pth'):
            torch.testing.assert_close(E.get_embedder('arcface', weights=tmp_path / f)(x), want, atol=1e-6, rtol=0)


def test_arcface_feeds_insightface_input_scaling():
    "ArcFace sees its 112² crop as (pixel − 127.5)/127.5, as arcface_torch was trained."
    arc = E.ArcFaceEmbedder(model=_small_iresnet())
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(arc.embed(x), arc.net((arc.chips(x) * 255 - 127.5) / 127.5), atol=1e-5, rtol=1e-5)


def test_arcface_crop_is_the_template_fit():
    "ARCFACE_CROP is the least-squares similarity fit of insightface's 112² template to the FFHQ five points, angle dropped."
    A, b = [], []
    for (u, v), (x, y) in zip(E.ARCFACE_TEMPLATE, E.FFHQ_FIVE_POINTS):
        A += [[u, -v, 1, 0], [v, u, 0, 1]]; b += [x, y]
    a, s, tx, ty = np.linalg.lstsq(np.array(A), np.array(b), rcond=None)[0]
    centre = np.array([[a, -s], [s, a]]) @ np.full(2, 55.5) + [tx, ty]
    assert E.ARCFACE_CROP.size == 112 and abs(E.ARCFACE_CROP.scale - np.hypot(a, s)) < 0.005
    np.testing.assert_allclose(E.ARCFACE_CROP.centre, centre, atol=0.05)


def test_a_file_that_is_not_dlibs_model_is_refused():
    "dlib weights= a file that is not dlib's .dat is refused, not loaded as a network of random weights."
    one_line_error(lambda: E.get_embedder('dlib', weights=data_path('tokenizer', 'vocab.json')), "is not dlib's")


def test_dlib_native_detects_a_face_off_the_ffhq_place():
    "dlib-native (detect=True) gives unit vectors and finds a face that is smaller and off-centre in the crop: the same descriptor as the aligned face."
    pytest.importorskip('dlib')
    from skimage.data import astronaut
    x = torch.from_numpy(E.detect_and_align(astronaut(), 'astronaut').aligned).permute(2, 0, 1)[None].float() / 255
    small = torch.full_like(x, 0.5)
    small[..., :358, :358] = torch.nn.functional.interpolate(x, size=(358, 358), mode='bilinear', antialias=True)
    det, fixed = E.DlibNativeEmbedder(detect=True), E.DlibNativeEmbedder(detect=False)
    ref = det(x)
    torch.testing.assert_close(ref.norm(dim=1), torch.ones(1), atol=1e-5, rtol=0)    # L2-normalised like every backend
    assert float((det(small) * ref).sum()) > 0.98
    assert float((fixed(small) * ref).sum()) < 0.95       # the fixed FFHQ box misses it: detection is what makes the difference
