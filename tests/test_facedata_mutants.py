"""Invariants of `ipfacediff.facedata` that no other test pinned down (mutation review of the face data: each test fails
on at least one code change that the notebook's checks and the rest of tests/ let through). What they pin: images are
resized with an antialiasing (bicubic) filter, so a fine pattern shrinks to its mean, not to one of its pixels;
`align_face` upsamples once, so a ~40-pixel face in a 256² still is found; a BLIP-2 caption that decodes to nothing
becomes 'a photo of a face', never an empty caption that `read_captions` would later refuse; the generic prompt pair is
("{generic_reference} {phrase}", generic_reference) with the table's own generic reference, and `EditPrompts`'s default
share of generic pairs is `FinetuneConfig`'s; phrases are drawn per caption, and categories matching no phrase are
refused; an uncaptioned dataset takes the `default_caption` given; quiet=True warns nothing yet still records skipped
images; `demo_faces` keeps an existing folder unless overwrite=True. Three bugs the review found stay fixed: a prompt table
that is a JSON array is a one-line error (was an AttributeError), a 'targets' string is one phrase (was split into
letters), one category given as a string is that category (was a TypeError). Real images (skimage's astronaut, the demo faces) and a tiny
random BLIP-2, offline, one core."""
import os, warnings

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np
import torch
from PIL import Image

torch.set_num_threads(1)

TABLE = {'attributes': [{'name': 'Eyeglasses', 'category': 'facial attribute', 'targets': ['wearing eyeglasses']}],
         'generic_reference': 'a close-up portrait'}


def test_load_image_shrinks_with_an_antialiasing_filter(tmp_path):
    "One-pixel black/white stripes shrunk 4× average to mid-grey (bicubic); a nearest-neighbour resize keeps pure 0/1."
    from ipfacediff.facedata import load_image
    a = np.zeros((64, 64, 3), np.uint8); a[:, ::2] = 255
    Image.fromarray(a).save(tmp_path / 'stripes.png')
    x = load_image(tmp_path / 'stripes.png', 16)
    assert x.shape == (3, 16, 16)
    assert float((x - 0.5).abs().max()) < 0.1, (float(x.min()), float(x.max()))


def test_align_face_upsamples_once_for_a_small_face():
    "The astronaut shrunk to 256² (face ~40 px): dlib's detector needs one upsampling to find it; the crop is size² uint8."
    from skimage.data import astronaut
    from ipfacediff.facedata import align_face
    small = np.asarray(Image.fromarray(astronaut()).resize((256, 256), Image.Resampling.BICUBIC))
    crop = align_face(small, 64)
    assert crop is not None and crop.shape == (64, 64, 3) and crop.dtype == np.uint8


def test_an_empty_blip2_caption_becomes_the_generic_one(tmp_path):
    "A BLIP-2 that emits end-of-text at once: the caption is 'a photo of a face', and the written file reads back."
    from test_inputs_and_caches import tiny_blip2
    from transformers import Blip2ForConditionalGeneration
    from ipfacediff.facedata import caption_images, read_captions
    model = tiny_blip2(tmp_path / 'blip')
    net = Blip2ForConditionalGeneration.from_pretrained(model)
    eos = net.config.text_config.eos_token_id
    with torch.no_grad():                                     # every hidden state → e0, and only EOS's logit sees e0
        ln = net.language_model.model.decoder.final_layer_norm
        ln.weight.zero_(); ln.bias.zero_(); ln.bias[0] = 1
        head = net.get_output_embeddings().weight
        head.zero_(); head[eos, 0] = 10
    net.save_pretrained(model)
    Image.new('RGB', (40, 40), (200, 100, 50)).save((tmp_path / 'imgs').mkdir() or tmp_path / 'imgs' / 'a.png')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        caps = caption_images(tmp_path / 'imgs', model=str(model), out=tmp_path / 'c.jsonl', device='cpu', dtype='float32',
                              max_new_tokens=3, progress=False)
    assert caps == {'a.png': 'a photo of a face'}
    assert read_captions(tmp_path / 'c.jsonl') == caps


def test_generic_pairs_are_the_tables_reference_then_the_phrase():
    "With generic_p=1 every pair is ('a close-up portrait wearing eyeglasses', 'a close-up portrait'): the table's reference, no comma."
    from ipfacediff.facedata import EditPrompts
    tar, ref = EditPrompts(TABLE, generic_p=1.0).sample(['a man with short hair'] * 3, torch.Generator().manual_seed(0))
    assert tar == ['a close-up portrait wearing eyeglasses'] * 3 and ref == ['a close-up portrait'] * 3
    ep = EditPrompts({k: v for k, v in TABLE.items() if k != 'generic_reference'}, generic_p=1.0)
    assert ep.sample(['x'], torch.Generator().manual_seed(0)) == (['a photo of a face wearing eyeglasses'], ['a photo of a face'])


def test_default_generic_share_is_the_finetune_default():
    "EditPrompts() draws generic pairs at FinetuneConfig's default share (0.25), measured over 4000 captions."
    import dataclasses
    from ipfacediff.facedata import EditPrompts
    from ipfacediff.finetune import FinetuneConfig
    want = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}['generic_p']
    ep = EditPrompts(TABLE)
    assert ep.generic_p == want == 0.25
    _, ref = ep.sample(['a man'] * 4000, torch.Generator().manual_seed(0))
    assert abs(sum(r == 'a close-up portrait' for r in ref) / 4000 - 0.25) < 0.03


def test_categories_with_no_phrase_are_refused():
    "Categories that match nothing in the table: a one-line error naming them, not an EditPrompts that fails later when sampled."
    from shared import one_line_error
    from ipfacediff.facedata import EditPrompts
    one_line_error(lambda: EditPrompts(TABLE, categories=('facial feature',)), "no edit prompts in the categories ['facial feature']")


def test_sampled_phrases_are_drawn_per_caption():
    "Each caption of a batch gets its own random phrase: 64 captions over the shipped table's phrases draw many different ones."
    from ipfacediff.facedata import EditPrompts
    ep = EditPrompts(generic_p=0.0)
    tar, ref = ep.sample(['a man'] * 64, torch.Generator().manual_seed(0))
    assert ref == ['a man'] * 64 and len(set(tar)) >= 10, sorted(set(tar))


def test_uncaptioned_dataset_uses_the_default_caption_given(tmp_path):
    "With no caption file every image gets `default_caption`, whatever it is."
    from ipfacediff.facedata import FaceDataset
    for n in 'ab': Image.new('RGB', (8, 8), (10, 20, 30)).save(tmp_path / f'{n}.png')
    ds = FaceDataset(tmp_path, size=8, default_caption='a close-up portrait', quiet=True)
    assert ds.captions == ['a close-up portrait'] * 2 and ds[1]['caption'] == 'a close-up portrait'


def test_quiet_dataset_warns_nothing_but_still_records(tmp_path):
    "quiet=True: a caption for an absent image and a broken image give no warning; the broken image is still skipped and named."
    from ipfacediff.facedata import FaceDataset
    Image.new('RGB', (8, 8), (10, 20, 30)).save(tmp_path / 'a.png'); (tmp_path / 'b.png').write_bytes(b'broken')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        ds = FaceDataset(tmp_path, {'a.png': 'A', 'b.png': 'B', 'zzz.png': 'absent'}, size=8, quiet=True)
    assert [str(x.message) for x in w] == []
    assert ds.paths == ['a.png'] and ds.skipped['b.png'].startswith('unreadable')


def test_demo_faces_overwrite_rebuilds_and_otherwise_keeps(tmp_path):
    "An existing demo folder is returned as it is (size 32 kept when 48 is asked), and rebuilt at the new size with overwrite=True."
    from ipfacediff.facedata import demo_faces, read_captions
    folder, caps = demo_faces(tmp_path / 'f', size=32, n_video=0)
    caps.write_text('{"image": "astronaut.png", "caption": "mine"}\n')
    demo_faces(folder, size=48, n_video=0)
    assert Image.open(folder / 'astronaut.png').size == (32, 32) and read_captions(caps) == {'astronaut.png': 'mine'}
    demo_faces(folder, size=48, n_video=0, overwrite=True)
    assert Image.open(folder / 'astronaut.png').size == (48, 48) and read_captions(caps)['astronaut.png'].startswith('a photo of a smiling')


# ---------------------------------------------------------------- bugs the review found

def test_prompt_table_that_is_not_an_object_is_a_user_error(tmp_path):
    "A prompt table whose top level is a JSON array or a string is the one-line error (it was an AttributeError: 'list' object has no attribute 'get')."
    from shared import one_line_error
    from ipfacediff.facedata import load_attributes
    for name, text in (('arr.json', '[{"name": "A", "category": "facial feature", "targets": ["smiling"]}]'), ('str.json', '"x"')):
        (tmp_path / name).write_text(text)
        one_line_error(lambda: load_attributes(tmp_path / name), 'prompt table', name)


def test_a_target_given_as_one_string_is_not_split_into_letters():
    "'targets': 'smiling' (a string, not a list) is the one phrase 'smiling' (it was the phrases 's', 'm', 'i', 'l', 'i', 'n', 'g')."
    from ipfacediff.facedata import EditPrompts
    table = {'attributes': [{'name': 'Smiling', 'category': 'facial feature', 'targets': 'smiling'}]}
    ep = EditPrompts(table)
    assert [ph for _, _, ph in ep.phrases] == ['smiling']


def test_one_category_given_as_a_string():
    "EditPrompts(categories='facial attribute') takes that one category (it was a TypeError on the shipped table's row without a category)."
    from ipfacediff.facedata import EditPrompts
    ep = EditPrompts(categories='facial attribute')
    assert {a['category'] for a in ep.attributes} == {'facial attribute'}
