"""Write data/tokenizer/: a small offline byte-level BPE tokenizer in CLIP's format (vocab.json,
merges.txt) for the tiny test components.

Its base alphabet is CLIP's (the 256 printable stand-ins for bytes, each also with the end-of-word
marker `</w>`), plus the merges learned by a few rounds of plain BPE on the prompt words below, so
common prompt words become one token as they would in the real tokenizer. Run from the repo root:
`python tools/make_tiny_tokenizer.py`.
"""
import collections, json, pathlib

def bytes_to_unicode():
    "CLIP/GPT-2's reversible map from bytes to printable unicode characters."
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs: bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, map(chr, cs)))

CORPUS = """a photo of a face of a man woman person with without add make her his older younger
smiling smile beard moustache mustache french goatee glasses sunglasses eyeglasses spectacles
bangs blonde black brown gray grey red hair curly straight wavy bald hat earrings lipstick makeup
heavy pale skin rosy cheeks big nose lips chubby double chin high cheekbones narrow eyes bags
under arched eyebrows bushy pointy receding hairline sideburns shadow five o'clock necktie
necklace attractive young old age gender expression happy sad angry surprised and the in
ugly blurry low res unrealistic unaesthetic portrait close up headshot""".split()

def learn_merges(words, n_merges=300):
    vocab = collections.Counter(tuple(w[:-1]) + (w[-1] + '</w>',) for w in words)
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in vocab.items():
            for a, b in zip(w, w[1:]): pairs[a, b] += c
        if not pairs: break
        (a, b), c = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if c < 2: break
        merges.append((a, b))
        new = collections.Counter()
        for w, cnt in vocab.items():
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and w[i] == a and w[i + 1] == b: out.append(a + b); i += 2
                else: out.append(w[i]); i += 1
            new[tuple(out)] += cnt
        vocab = new
    return merges

def main(out='data/tokenizer'):
    out = pathlib.Path(out); out.mkdir(parents=True, exist_ok=True)
    base = list(bytes_to_unicode().values())
    tokens = base + [c + '</w>' for c in base]
    merges = learn_merges([w.lower() for w in CORPUS])
    tokens += [a + b for a, b in merges]
    tokens += ['<|startoftext|>', '<|endoftext|>']
    vocab = {t: i for i, t in enumerate(tokens)}
    (out / 'vocab.json').write_text(json.dumps(vocab, ensure_ascii=False))
    (out / 'merges.txt').write_text('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges), encoding='utf-8')
    cfg = {'tokenizer_class': 'CLIPTokenizer', 'model_max_length': 77, 'bos_token': '<|startoftext|>',
           'eos_token': '<|endoftext|>', 'unk_token': '<|endoftext|>', 'pad_token': '!',
           'do_lower_case': True, 'clean_up_tokenization_spaces': False}
    (out / 'tokenizer_config.json').write_text(json.dumps(cfg, indent=1))
    print(f'{out}: {len(vocab)} tokens, {len(merges)} merges')

if __name__ == '__main__': main()
