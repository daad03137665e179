"""Invariants of `ipfacediff.models` that no other test pinned down (mutation review of loading SD's parts and the
branches ε1 / ε2: each test fails on at least one code change that the notebook's checks and the rest of tests/ let
through). What they pin: prompt embeddings come out in the UNet's dtype and the truncation warning starts at 76 content
tokens, not 75; a schedule whose ᾱ table is not 1000 long is refused even when its config says 1000; a branch loaded
from a peft adapter or a UNet folder is frozen, in eval mode and in the base's dtype; a pipeline folder given as a
branch gives its unet/; a UNet folder with a stray LoRA file beside its weights is still a UNet folder. Tiny random
models, offline, one core."""
import copy, os, warnings

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest
import torch

from ipfacediff.models import encode_prompt, load_branch, make_scheduler, check_scheduler, save_components, tiny_components

torch.set_num_threads(1)
from shared import one_line_error


@pytest.fixture(scope='module')
def tc():
    return tiny_components(0)


def _frozen_in(m, dtype):
    "All parameters of `m` in `dtype`, none trainable, and `m` in eval mode."
    ps = list(m.parameters())
    return {p.dtype for p in ps} == {dtype} and not any(p.requires_grad for p in ps) and not m.training


def test_encode_prompt_gives_the_unets_dtype(tc):
    "c is cast to the UNet's dtype (the cross-attention's input) even when the text encoder runs in another one."
    c = copy.copy(tc); c.unet = copy.deepcopy(tc.unet).double()
    assert c.text_encoder.dtype == torch.float32
    assert encode_prompt(c, 'a face').dtype == torch.float64


def test_truncation_warning_starts_past_75_tokens(tc):
    "75 content tokens (+ start and end = 77) fit CLIP exactly: no warning; 76 are one too many: a warning saying so."
    tok = tc.tokenizer
    fits, over = ' '.join(['a'] * 75), ' '.join(['a'] * 76)
    assert len(tok(fits).input_ids) == 77 and len(tok(over).input_ids) == 78      # independent count: 'a' is one token
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        encode_prompt(tc, fits)
    assert not [x for x in w if 'CLIP reads' in str(x.message)], [str(x.message) for x in w]
    with pytest.warns(UserWarning, match='76 tokens long and CLIP reads 75'):
        encode_prompt(tc, over)


def test_check_scheduler_refuses_an_alpha_table_not_1000_long():
    "A schedule whose trained betas give 500 ᾱ values is refused though its config claims num_train_timesteps=1000."
    s = make_scheduler(trained_betas=[0.01] * 500)
    assert s.config.num_train_timesteps == 1000 and len(s.alphas_cumprod) == 500
    one_line_error(lambda: check_scheduler(s, 'm'), 'trained with 500 timesteps', 'needs 1000')   # the length that is off, not the config's


@pytest.fixture(scope='module')
def base64(tc):
    "The tiny base UNet in float64 (a dtype no saved branch has), left trainable and in training mode: the branch must not inherit either."
    return copy.deepcopy(tc.unet).double().train().requires_grad_(True)


def test_peft_branch_is_frozen_in_the_bases_dtype(tc, base64, tmp_path):
    "A peft adapter (saved in float32) merged into a float64, trainable base: float64, eval mode, no gradients; the base is left as it was."
    from peft import LoraConfig, get_peft_model
    get_peft_model(copy.deepcopy(tc.unet), LoraConfig(r=2, target_modules=['to_q'], init_lora_weights=False)).save_pretrained(tmp_path / 'l')
    assert _frozen_in(load_branch(tmp_path / 'l', base64, 'ε2'), torch.float64)
    assert all(p.requires_grad for p in base64.parameters())


def test_unet_folder_branch_is_frozen_in_the_bases_dtype(base64, tmp_path):
    "A UNet folder (saved in float32) given as a branch of a float64 base: float64, eval mode, no gradients."
    tiny_components(1).unet.save_pretrained(tmp_path / 'u')
    assert _frozen_in(load_branch(tmp_path / 'u', base64, 'ε2'), torch.float64)


def test_pipeline_folder_as_branch_gives_its_unet(tc, tmp_path):
    "A local folder in diffusers' pipeline layout given as a branch: the UNet in its unet/ subfolder, weight for weight."
    other = tiny_components(1)
    save_components(other, tmp_path / 'sd')
    got = load_branch(tmp_path / 'sd', tc.unet, 'ε2')
    a, b = got.state_dict(), other.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unet_folder_with_a_stray_lora_file_is_still_a_unet_folder(tc, tmp_path):
    "A UNet folder (config.json + weights) that also holds a LoRA-named .safetensors loads as the UNet, not as that file."
    from safetensors.torch import save_file
    other = tiny_components(1).unet
    other.save_pretrained(tmp_path / 'u')
    save_file({'unet.down_blocks.0.attentions.0.lora.down.weight': torch.zeros(2, 16)}, str(tmp_path / 'u' / 'notes.safetensors'))
    got = load_branch(tmp_path / 'u', tc.unet, 'ε2')
    assert torch.equal(got.conv_in.weight, other.conv_in.weight)
