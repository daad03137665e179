"""Loading SD parts and branches (nbs/01_models.ipynb): UNets that do not fit the base or the text encoder are
refused with one line naming the config key, a cached hub id of a full pipeline gives its unet/, a single-file
checkpoint is named as such, and a diffusers-format LoRA is fused like a peft one. Tiny random models, offline."""
import copy, shutil
from pathlib import Path
import pytest, torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from ipfacediff.utils import UserError
from ipfacediff.models import encode_prompt, load_branch, load_components, save_components, tiny_components

torch.set_num_threads(1)
LORA = dict(r=4, lora_alpha=4, target_modules=['to_q', 'to_k', 'to_v', 'to_out.0'], init_lora_weights=False)


@pytest.fixture(scope='module')
def tc():
    return tiny_components()


@pytest.fixture(scope='module')
def inputs(tc):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        z = torch.randn(2, 4, 16, 16)
    return z, encode_prompt(tc, ['add a beard', 'a face'])


from shared import one_line_error


def variant(tc, **cfg):
    "A tiny UNet like `tc.unet` but for the config changes `cfg`."
    base = {k: v for k, v in tc.unet.config.items() if not k.startswith('_')}   # `_use_default_values` would undo `cfg`
    return UNet2DConditionModel.from_config({**base, **cfg})


def fake_hub_cache(monkeypatch, cache: Path, repo_id: str, src: Path):
    "Make `src` the cached snapshot of `repo_id` in a hub cache at `cache`, and point the hub at it."
    import huggingface_hub.constants as C
    root = cache / f"models--{repo_id.replace('/', '--')}"
    commit = '0123456789abcdef0123456789abcdef01234567'
    shutil.copytree(src, root / 'snapshots' / commit)
    (root / 'refs').mkdir(parents=True, exist_ok=True)
    (root / 'refs' / 'main').write_text(commit)
    monkeypatch.setattr(C, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(C, 'HF_HUB_OFFLINE', True)


# 1. architecture that does not fit

@pytest.mark.parametrize('cfg,key,values', [
    (dict(cross_attention_dim=16), 'cross_attention_dim', ('16', '32')),
    (dict(in_channels=9), 'in_channels', ('9 (an inpainting UNet)', '4')),
    (dict(out_channels=8), 'out_channels', ('8', '4')),
    (dict(block_out_channels=(16, 16, 32, 64)), 'block_out_channels', ('(16, 16, 32, 64)', '(16, 16, 32, 32)')),
    (dict(addition_embed_type='text'), 'addition_embed_type', ("text", 'None')),
])
def test_branch_that_does_not_fit_is_refused(tc, tmp_path, cfg, key, values):
    variant(tc, **cfg).save_pretrained(tmp_path / 'u')
    one_line_error(lambda: load_branch(tmp_path / 'u', tc.unet, 'edit model (ε2)'),
                   'edit model (ε2)', f'its {key} is {values[0]}', f"the base's is {values[1]}")


def test_branch_config_spelled_differently_still_fits(tc, tmp_path, inputs):
    "Per-block values given once or per block, heads as attention_head_dim, and keys left out (defaults) are the same architecture."
    z, c = inputs
    tc.unet.save_pretrained(tmp_path / 'u')
    cfg = (tmp_path / 'u' / 'config.json')
    import json
    d = json.loads(cfg.read_text())
    d.update(cross_attention_dim=[32] * 4, layers_per_block=[2] * 4, num_attention_heads=None, attention_head_dim=2)
    for k in ('transformer_layers_per_block', 'mid_block_type', 'addition_embed_type', 'class_embed_type',
              'encoder_hid_dim_type', 'time_cond_proj_dim', 'num_attention_heads'):
        del d[k]                                  # a config written by an older diffusers lacks these: defaults hold
    cfg.write_text(json.dumps(d))
    m = load_branch(tmp_path / 'u', tc.unet)
    with torch.no_grad(): assert torch.equal(m(z, 10, encoder_hidden_states=c).sample, tc.unet(z, 10, encoder_hidden_states=c).sample)


def test_branch_folder_with_another_model_is_refused(tc, tmp_path):
    tc.vae.save_pretrained(tmp_path / 'vae')
    one_line_error(lambda: load_branch(tmp_path / 'vae', tc.unet), 'holds a AutoencoderKL, not a UNet2DConditionModel')


@pytest.mark.parametrize('cfg,parts', [
    (dict(in_channels=9), ('has in_channels 9 (an inpainting model), not 4', 'text-to-image')),
    (dict(cross_attention_dim=16), ('cross_attention_dim 16', "text encoder's hidden_size is 32")),
    (dict(out_channels=8), ('has out_channels 8, not 4',)),
    (dict(addition_embed_type='text'), ("addition_embed_type='text'",)),
])
def test_components_whose_unet_does_not_fit_are_refused(tc, tmp_path, cfg, parts):
    save_components(tc, tmp_path / 'sd')
    shutil.rmtree(tmp_path / 'sd' / 'unet')
    variant(tc, **cfg).save_pretrained(tmp_path / 'sd' / 'unet')
    one_line_error(lambda: load_components(tmp_path / 'sd'), *parts)


def test_components_that_fit_still_load(tc, tmp_path):
    save_components(tc, tmp_path / 'sd')
    assert load_components(tmp_path / 'sd').unet.config.in_channels == 4


# 2. a cached hub id of a full pipeline

def test_branch_from_cached_pipeline_hub_id(tc, tmp_path, monkeypatch, inputs):
    z, c = inputs
    ft = tiny_components(seed=1)                  # a "fine-tuned" pipeline: same layout, other weights
    save_components(ft, tmp_path / 'pipe')
    fake_hub_cache(monkeypatch, tmp_path / 'cache', 'someone/tiny-sd', tmp_path / 'pipe')
    m = load_branch('someone/tiny-sd', tc.unet, 'identity model (ε1)')
    with torch.no_grad():
        assert torch.equal(m(z, 10, encoder_hidden_states=c).sample, ft.unet(z, 10, encoder_hidden_states=c).sample)


def test_branch_from_cached_unet_hub_id_and_uncached_id(tc, tmp_path, monkeypatch):
    tc.unet.save_pretrained(tmp_path / 'u')
    fake_hub_cache(monkeypatch, tmp_path / 'cache', 'someone/tiny-unet', tmp_path / 'u')
    assert isinstance(load_branch('someone/tiny-unet', tc.unet), UNet2DConditionModel)
    one_line_error(lambda: load_branch('someone/not-cached', tc.unet, 'ε2'), 'could not load ε2', 'cached hub id')


def test_cached_pipeline_hub_id_that_does_not_fit_is_refused(tc, tmp_path, monkeypatch):
    save_components(tiny_components(hidden=16), tmp_path / 'pipe')
    fake_hub_cache(monkeypatch, tmp_path / 'cache', 'someone/other-sd', tmp_path / 'pipe')
    one_line_error(lambda: load_branch('someone/other-sd', tc.unet), 'its cross_attention_dim is 16', "the base's is 32")


# 3. single-file checkpoints

@pytest.mark.parametrize('fname', ['v2-1_512-ema-pruned.safetensors', 'model.ckpt'])
def test_single_file_checkpoint_is_named(tmp_path, fname):
    f = tmp_path / fname
    f.write_bytes(b'\0' * 16)
    msg = one_line_error(lambda: load_components(f), 'single-file checkpoint', 'from_single_file(', '.save_pretrained(', '--model DIR')
    assert 'does not exist' not in msg


def test_single_file_checkpoint_as_branch_is_named(tc, tmp_path):
    from safetensors.torch import save_file
    save_file({'model.diffusion_model.out.2.weight': torch.zeros(4)}, tmp_path / 'sd.safetensors')
    one_line_error(lambda: load_branch(tmp_path / 'sd.safetensors', tc.unet), 'single-file checkpoint', 'from_single_file(')


def test_missing_model_folder_and_other_file(tmp_path):
    one_line_error(lambda: load_components(tmp_path / 'nope'), 'does not exist')
    (tmp_path / 'notes.txt').write_text('x')
    one_line_error(lambda: load_components(tmp_path / 'notes.txt'), 'is a file', 'unet/')


# 4. diffusers-format LoRA

def _diffusers_lora(tc, folder, r=4, alpha=4, text_encoder=False):
    "Save a random LoRA on `tc.unet` the way diffusers' training scripts do; return the peft model (the reference)."
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    torch.manual_seed(3)
    cfg = LoraConfig(**{**LORA, 'r': r, 'lora_alpha': alpha})
    ref = copy.deepcopy(tc.unet)
    ref.add_adapter(cfg)                        # as diffusers' train_text_to_image_lora.py does
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(ref))
    te = None
    if text_encoder:
        te_model = copy.deepcopy(tc.text_encoder)
        te_model.add_adapter(LoraConfig(r=2, target_modules=['q_proj'], init_lora_weights=False))
        te = convert_state_dict_to_diffusers(get_peft_model_state_dict(te_model))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, text_encoder_lora_layers=te,
                                              unet_lora_adapter_metadata=cfg.to_dict())
    return ref


@pytest.mark.parametrize('r,alpha', [(4, 4), (4, 8)])
def test_diffusers_lora_folder_is_fused(tc, tmp_path, inputs, r, alpha):
    z, c = inputs
    ref = _diffusers_lora(tc, tmp_path / 'lora', r, alpha)
    assert (tmp_path / 'lora' / 'pytorch_lora_weights.safetensors').is_file() and not (tmp_path / 'lora' / 'adapter_config.json').exists()
    with torch.no_grad(): base0 = tc.unet(z, 10, encoder_hidden_states=c).sample
    for spec in (tmp_path / 'lora', tmp_path / 'lora' / 'pytorch_lora_weights.safetensors'):
        m = load_branch(spec, tc.unet, 'edit model (ε2)')
        assert not any('lora' in n for n, _ in m.named_modules())     # fused: a plain UNet
        with torch.no_grad():
            out, want = m(z, 10, encoder_hidden_states=c).sample, ref(z, 10, encoder_hidden_states=c).sample
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        assert (out - base0).abs().max() > 1e-4
    with torch.no_grad(): assert torch.equal(tc.unet(z, 10, encoder_hidden_states=c).sample, base0)   # base untouched


def test_diffusers_lora_with_text_encoder_part_is_refused(tc, tmp_path):
    _diffusers_lora(tc, tmp_path / 'lora', text_encoder=True)
    one_line_error(lambda: load_branch(tmp_path / 'lora', tc.unet), 'text-encoder LoRA', 'UNet alone')


def test_diffusers_lora_for_another_unet_is_refused(tc, tmp_path):
    other = tiny_components(hidden=16)
    _diffusers_lora(other, tmp_path / 'lora')
    one_line_error(lambda: load_branch(tmp_path / 'lora', tc.unet, 'ε1'), 'ε1', 'is not a LoRA for this UNet')


def test_kohya_lora_file_is_fused(tc, tmp_path, inputs):
    "A LoRA with kohya/A1111 key names (lora_unet_…, lora_down/lora_up, alpha), in a folder under any name or as the file."
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    z, c = inputs
    torch.manual_seed(4)
    ref = copy.deepcopy(tc.unet)
    ref.add_adapter(LoraConfig(**{**LORA, 'lora_alpha': 8}))
    kohya = {}
    for key, v in get_peft_model_state_dict(ref).items():
        mod, ab = key.split('.lora_')
        stem = 'lora_unet_' + mod.replace('.', '_')
        kohya[stem + ('.lora_down.weight' if ab.startswith('A') else '.lora_up.weight')] = v.contiguous()
        kohya[stem + '.alpha'] = torch.tensor(8.0)
    (tmp_path / 'k').mkdir()
    save_file(kohya, tmp_path / 'k' / 'beard_v1.safetensors')
    with torch.no_grad(): want = ref(z, 10, encoder_hidden_states=c).sample
    for spec in (tmp_path / 'k', tmp_path / 'k' / 'beard_v1.safetensors'):
        with torch.no_grad(): out = load_branch(spec, tc.unet)(z, 10, encoder_hidden_states=c).sample
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# 5. a hub id of a LoRA

def _lora_unet(tc, seed):
    u = copy.deepcopy(tc.unet)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        u.add_adapter(LoraConfig(**LORA))
    return u


def test_branch_from_cached_lora_hub_ids(tc, tmp_path, monkeypatch, inputs):
    "A hub id whose repo holds diffusers' pytorch_lora_weights or a peft adapter is that LoRA, fused like the local file or folder."
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    z, c = inputs
    u = _lora_unet(tc, 1)
    StableDiffusionLoraLoaderMixin.save_lora_weights(tmp_path / 'dlora', unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(u)), unet_lora_adapter_metadata=u.peft_config['default'].to_dict())
    with torch.random.fork_rng():
        torch.manual_seed(2)
        p = get_peft_model(copy.deepcopy(tc.unet), LoraConfig(**LORA))
    p.save_pretrained(tmp_path / 'plora')
    fake_hub_cache(monkeypatch, tmp_path / 'cache', 'someone/diffusers-lora', tmp_path / 'dlora')
    fake_hub_cache(monkeypatch, tmp_path / 'cache', 'someone/peft-lora', tmp_path / 'plora')
    with torch.no_grad():
        base = tc.unet(z, 10, encoder_hidden_states=c).sample
        for hub_id, ref in (('someone/diffusers-lora', u), ('someone/peft-lora', p)):
            out, want = (m(z, 10, encoder_hidden_states=c).sample for m in (load_branch(hub_id, tc.unet, 'ε2'), ref))
            torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
            assert (out - base).abs().max() > 1e-4, hub_id


def test_pipeline_batches_lora_hub_ids(tc, tmp_path, monkeypatch):
    "Two peft LoRAs given by hub id share one UNet's forwards as local adapter folders do."
    from peft import get_peft_model
    from ipfacediff.pipeline import IPFaceDiffPipeline
    for i, name in enumerate(('id-lora', 'edit-lora')):
        with torch.random.fork_rng():
            torch.manual_seed(i)
            get_peft_model(copy.deepcopy(tc.unet), LoraConfig(**LORA)).save_pretrained(tmp_path / name)
        fake_hub_cache(monkeypatch, tmp_path / 'cache', f'someone/{name}', tmp_path / name)
    comps = tiny_components()
    p = IPFaceDiffPipeline.from_components(comps, 'someone/id-lora', 'someone/edit-lora', cache_dir=tmp_path / 'c', progress=False)
    assert p.adapters is not None and p.eps1 is p.eps2


# 6. LoRA files that used to load wrongly or give advice that cannot work

def _kohya(tc, spec, seed=0):
    "A kohya-format state dict for `spec` {layer: (rank, alpha)} and the weights each layer should end with."
    mods, g = dict(tc.unet.named_modules()), torch.Generator().manual_seed(seed)
    sd, want = {}, {}
    for t, (r, a) in spec.items():
        W = mods[t].weight
        if W.ndim == 4:
            down, up = torch.randn(r, W.shape[1], *W.shape[2:], generator=g), torch.randn(W.shape[0], r, 1, 1, generator=g)
            delta = (up.flatten(1) @ down.flatten(1)).view_as(W)
        else:
            down, up = torch.randn(r, W.shape[1], generator=g), torch.randn(W.shape[0], r, generator=g)
            delta = up @ down
        k = 'lora_unet_' + t.replace('.', '_')
        sd[k + '.lora_down.weight'], sd[k + '.lora_up.weight'], sd[k + '.alpha'] = down, up, torch.tensor(a)
        want[t] = W + a / r * delta
    return sd, want


def test_kohya_lora_with_per_layer_alphas_is_fused_at_each_layers_scale(tc, tmp_path):
    from safetensors.torch import save_file
    spec = {'up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q': (4, 2.0),
            'up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_k': (2, 1.0),
            'up_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v': (4, 4.0),
            'down_blocks.0.attentions.0.proj_in': (8, 4.0),
            'mid_block.attentions.0.transformer_blocks.0.ff.net.2': (8, 8.0)}
    sd, want = _kohya(tc, spec)
    save_file(sd, str(tmp_path / 'k.safetensors'))
    got = dict(load_branch(tmp_path / 'k.safetensors', tc.unet, 'ε2').named_modules())
    for t in spec: torch.testing.assert_close(got[t].weight, want[t], atol=1e-5, rtol=1e-5, msg=t)   # was 2× and 4× off on to_q/to_k


def test_peft_adapter_whose_keys_do_not_fit_is_refused(tc, tmp_path):
    from peft import get_peft_model
    from safetensors.torch import load_file, save_file
    get_peft_model(copy.deepcopy(tc.unet), LoraConfig(**LORA)).save_pretrained(tmp_path / 'lora')
    f = tmp_path / 'lora' / 'adapter_model.safetensors'
    save_file({k.replace('base_model.model.', 'base_model.model.unet.'): v for k, v in load_file(str(f)).items()}, str(f))
    one_line_error(lambda: load_branch(tmp_path / 'lora', tc.unet, 'edit model (ε2)'), 'does not fit this UNet', 'base_model.model.unet.')


def test_files_that_are_not_checkpoints_get_advice_that_works(tc, tmp_path):
    tc.unet.save_pretrained(tmp_path / 'eps2' / 'unet')
    f = tmp_path / 'eps2' / 'unet' / 'diffusion_pytorch_model.safetensors'
    msg = one_line_error(lambda: load_branch(f, tc.unet, 'ε2'), 'is the weights file of the model folder', 'pass the folder')
    assert 'from_single_file' not in msg
    sd, _ = _kohya(tc, {'up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q': (4, 4.0)})
    torch.save(sd, tmp_path / 'face_lora.pt')
    one_line_error(lambda: load_branch(tmp_path / 'face_lora.pt', tc.unet, 'ε2'), 'holds LoRA weights saved with torch.save', '.safetensors')


def test_folder_with_several_lora_files_names_them(tc, tmp_path):
    from safetensors.torch import save_file
    from ipfacediff.models import check_branch
    sd, _ = _kohya(tc, {'up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q': (4, 4.0)})
    for n in ('face-000010.safetensors', 'face.safetensors'): save_file(sd, str(tmp_path / n))   # kohya: per-epoch saves and the final one
    for f in (lambda: check_branch(tmp_path, 'ε2'), lambda: load_branch(tmp_path, tc.unet, 'ε2')):
        one_line_error(f, 'holds 2 LoRA files', 'face-000010.safetensors', 'pass the one you mean')


def test_batched_adapter_whose_keys_do_not_fit_is_refused(tmp_path):
    "The batched path (both branches LoRA adapters of one UNet) checks the keys too, and leaves the base UNet without adapters."
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file, save_file
    from ipfacediff.pipeline import IPFaceDiffPipeline
    comps = tiny_components()
    get_peft_model(copy.deepcopy(comps.unet), LoraConfig(**LORA)).save_pretrained(tmp_path / 'lora')
    f = tmp_path / 'lora' / 'adapter_model.safetensors'
    save_file({k.replace('base_model.model.', 'base_model.model.unet.'): v for k, v in load_file(str(f)).items()}, str(f))
    one_line_error(lambda: IPFaceDiffPipeline.from_components(comps, None, tmp_path / 'lora', cache_dir=tmp_path / 'c', progress=False),
                   'edit model (ε2)', 'does not fit this UNet')
    assert not any(isinstance(m, LoraLayer) for m in comps.unet.modules())
    # a good ε1 adapter and an unreadable ε2 one: refused, and ε1's layers are gone from the base again
    get_peft_model(copy.deepcopy(comps.unet), LoraConfig(**LORA)).save_pretrained(tmp_path / 'good')
    (tmp_path / 'broken').mkdir(); shutil.copy(tmp_path / 'good' / 'adapter_config.json', tmp_path / 'broken')
    (tmp_path / 'broken' / 'adapter_model.safetensors').write_bytes(b'not safetensors')
    one_line_error(lambda: IPFaceDiffPipeline.from_components(comps, tmp_path / 'good', tmp_path / 'broken', cache_dir=tmp_path / 'c', progress=False),
                   'edit model (ε2)', 'is not a LoRA adapter for this UNet')
    assert not any(isinstance(m, LoraLayer) for m in comps.unet.modules())
