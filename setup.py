"""Packaging for ipfacediff: every piece of metadata is read from settings.ini (nbdev 2 layout)."""
from configparser import ConfigParser
from pathlib import Path
from setuptools import setup

here = Path(__file__).parent
cfg = ConfigParser(delimiters=['='])
cfg.read(here / 'settings.ini', encoding='utf-8')
c = cfg['DEFAULT']

def reqs(key): return c.get(key, '').split()

licenses = {'apache2': 'Apache-2.0'}  # SPDX expression
readme = here / 'README.md'

setup(
    name=c['lib_name'],
    version=c['version'],
    description=c['description'],
    long_description=readme.read_text(encoding='utf-8') if readme.exists() else c['description'],
    long_description_content_type='text/markdown',
    author=c['author'], author_email=c['author_email'],
    license=licenses[c['license']],
    classifiers=['Programming Language :: Python :: 3',
                 'Development Status :: 3 - Alpha', 'Intended Audience :: Developers'],
    keywords=c['keywords'],
    python_requires=f">={c['min_python']}",
    # the shipped assets in data/ (sample clip, tiny tokenizer, prompt table) become
    # the subpackage ipfacediff.data in an installed wheel; a checkout reads them from data/ directly
    packages=['ipfacediff', 'ipfacediff.data'],
    package_dir={'ipfacediff': 'ipfacediff', 'ipfacediff.data': 'data'},
    package_data={'ipfacediff.data': ['*', '*/*', '*/*/*']},
    install_requires=reqs('requirements'),
    extras_require={'dev': reqs('dev_requirements'),
                    'insightface': reqs('insightface_requirements'),
                    'openclip': reqs('openclip_requirements')},
    entry_points={'console_scripts': c['console_scripts'].split(),
                  'nbdev': [f"{c['lib_path']}={c['lib_path']}._modidx:d"]},
    zip_safe=False,
)
